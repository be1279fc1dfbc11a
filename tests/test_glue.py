"""GLUE: task registry, local data, metrics, the config table, embedding adapters (llmm.embedding), and
scripts/train_glue.py + eval_glue.py + glue_table.py end to end.

The end-to-end runs train a tiny DeBERTa-v2 (saved to a temporary directory with an offline word-level
tokenizer built over the fixture text) for two steps on the fixture files in tests/data/glue; with the default
protocol its word, position and relative-position embedding tables are quantized with their own pairs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEBERTA_TARGETS, tiny_deberta
from safetensors import safe_open
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from llmm.run.schema import GlueRun
from llmm import LlmmConfig, get_llmm_model, llmm_layers, load_llmm_model, noise_mode
from llmm.embedding import LlmmEmbedding
from llmm.tasks.glue import LOCAL_ONLY_TASKS, TASKS, get_task, load_glue, task_metrics, tokenize
from llmm import outdirs
from llmm.quant import ALLOWED_METHODS, fake_quantize
from llmm.run import cli, glue_eval, glue_report
from scripts import eval_glue, glue_table, train_glue
from llmm.run import glue as glue_run
from llmm.run.adapters import llmm_config
from llmm.run.tables import read_yaml, table_rows

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "glue"

# SPEC §3: (quant, rank, task) -> (lr, llmmscale, K), the seed's twelve rows.
SEED_ROWS = {
    ("nf", 32, "cola"): (5e-5, 600, 1), ("nf", 32, "mrpc"): (1e-4, 600, 1), ("nf", 32, "stsb"): (1e-4, 700, 1),
    ("nf", 16, "cola"): (1e-4, 1000, 1), ("nf", 16, "mrpc"): (1e-4, 500, 1), ("nf", 16, "stsb"): (1e-4, 700, 1),
    ("uniform", 32, "cola"): (1e-4, 4000, 1), ("uniform", 32, "mrpc"): (1e-4, 100, 1),
    ("uniform", 32, "stsb"): (5e-5, 300, 1), ("uniform", 16, "cola"): (1e-4, 1000, 2),
    ("uniform", 16, "mrpc"): (1e-4, 700, 1), ("uniform", 16, "stsb"): (5e-5, 300, 1),
}


def save_tiny_model(path: Path) -> str:
    """A 2-layer DeBERTa-v2 encoder (no head, like the hub checkpoint) and a word-level tokenizer, offline."""
    texts = [line for file in sorted(DATA.rglob("*.tsv")) for line in file.read_text().splitlines()]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=128, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    tiny_deberta(0, 2).deberta.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_deberta"))


SMOKE = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
         "--per_device_eval_batch_size", "8"]

# name -> flags; each trains for two steps on the fixture data.
RUNS = {
    "cola-llmm-mc": ["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--eval_noise", "mc",
                     "--mc_samples", "2"],
    "mrpc-qlora": ["--task", "mrpc", "--quant", "uniform", "--rank", "16", "--method", "qlora"],
    "stsb-llmm-mc": ["--task", "stsb", "--quant", "uniform", "--rank", "16", "--eval_noise", "mc", "--mc_samples", "2",
                     "--gaussian_embeddings", "true"],
    "cola-lora": ["--task", "cola", "--quant", "nf", "--rank", "16", "--method", "lora"],
    "mrpc-loftq": ["--task", "mrpc", "--quant", "nf", "--rank", "16", "--method", "loftq"],
}


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("glue_runs")
    for name, flags in RUNS.items():
        train_glue.main([*flags, *SMOKE, "--model", model_dir, "--data_dir", str(DATA),
                         "--output_dir", str(root / name)])
    return root


# ------------------------------------------------------------------------------------------------------ metrics


def test_metrics_agree_with_hand_computed_values():
    labels, predictions = [1, 1, 0, 0], [1, 0, 0, 0]  # TP 1, FN 1, TN 2, FP 0
    assert task_metrics(get_task("cola"), predictions, labels) == pytest.approx(
        {"matthews_correlation": 2 / 12**0.5})  # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    assert task_metrics(get_task("mrpc"), predictions, labels) == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})
    assert task_metrics(get_task("qqp"), predictions, labels) == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})
    assert task_metrics(get_task("mnli"), [0, 1, 2, 2], [0, 1, 2, 0]) == {"accuracy": 0.75}
    # x - mean = (-1.5, -.5, .5, 1.5), y - mean = (-1.75, -.75, .25, 2.25): r = 6.5 / sqrt(5 * 8.75)
    scores = task_metrics(get_task("stsb"), [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    assert scores == pytest.approx({"pearson": 6.5 / (5 * 8.75) ** 0.5, "spearmanr": 1.0})
    assert task_metrics(get_task("stsb"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] is None  # undefined -> None
    from llmm.tasks.glue import score

    diverged = score(get_task("mrpc"), np.full((4, 2), np.nan), labels)  # argmax would read NaN rows as class 0
    assert diverged["accuracy"] is None and diverged["f1"] is None and np.isnan(diverged["nll"])


def test_task_registry():
    assert list(TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "bbcnews"]
    assert LOCAL_ONLY_TASKS == ("bbcnews",)  # the quick start's task, not GLUE
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").dev_splits == ("validation_matched", "validation_mismatched")
    with pytest.raises(ValueError, match="unknown GLUE task 'glue'; choose one of cola, sst2"):
        get_task("glue")


# ----------------------------------------------------------------------------------------------------- the table


def test_every_table_row_parses():
    table = read_yaml(REPO / "configs" / "glue.yaml")
    all_rows = table_rows(table)  # raises on duplicate keys
    assert table["keys"] == ["task", "quant", "rank"]
    rows = [r for r in all_rows if r["task"] not in LOCAL_ONLY_TASKS]
    assert {(r["task"], r["quant"], r["rank"]) for r in rows} == {
        (t, q, r) for t in TASKS if t not in LOCAL_ONLY_TASKS for q in ALLOWED_METHODS for r in (16, 32)}
    assert [(r["task"], r["quant"], r["rank"]) for r in all_rows if r not in rows] == [("bbcnews", "nf", 16)]
    for row in rows:
        assert row["source"] and row["lora_alpha"] == row["rank"] and row["bits"] == 2
        assert isinstance(row["learning_rate"], float) and 0 < row["learning_rate"] <= 1e-3, row
        assert isinstance(row["llmmscale"], float) and isinstance(row["K"], int) and isinstance(row["num_train_epochs"], int)
        for bits in (2, 4):
            config = llmm_config(GlueRun.of({**row, "bits": bits, "init": "loftq"}), ["query_proj"])
            assert config.k == row["K"] and config.scale == row["llmmscale"] and config.r == row["rank"]
        paper = SEED_ROWS.get((row["quant"], row["rank"], row["task"]))
        assert (row["source"] == "MeMoTune paper") == (paper is not None)
        if paper:
            assert (row["learning_rate"], row["llmmscale"], row["K"], row["num_train_epochs"]) == (*paper, 60)
        else:
            assert row["source"].startswith("LoftQ defaults (not from the paper)")
    defaults = table["defaults"]
    assert (defaults["per_device_train_batch_size"], defaults["gradient_accumulation_steps"], defaults["max_length"],
            defaults["loftq_iter"]) == (16, 2, 128, 5)
    assert "python -m scripts.train_glue" in (REPO / "configs" / "glue.yaml").read_text().split("keys:")[0]


def test_settings_precedence_and_method():
    _, settings = glue_run.resolve(["--task", "cola", "--quant", "uniform", "--rank", "16", "--bits", "4",
                                      "--learning_rate", "3e-4"])
    assert (settings["bits"], settings["learning_rate"], settings["K"], settings["llmmscale"]) == (4, 3e-4, 2, 1000.0)
    assert settings["num_train_epochs"] == 60 and settings["source"] == "MeMoTune paper" and settings["init"] == "loftq"
    _, baseline = glue_run.resolve(["--task", "rte", "--quant", "nf", "--rank", "32", "--method", "qlora"])
    assert (baseline["K"], baseline["init"], baseline["num_train_epochs"], baseline["learning_rate"]) == (0, "lora", 20, 5e-5)
    with pytest.raises(ValueError, match="use --method llmm"):
        glue_run.resolve(["--task", "rte", "--quant", "nf", "--rank", "32", "--method", "loftq", "--K", "2"])
    with pytest.raises(ValueError, match="no row for"):
        glue_run.resolve(["--task", "rte", "--quant", "nf", "--rank", "8"])
    with pytest.raises(SystemExit):  # unknown flags are argparse errors
        glue_run.resolve(["--task", "rte", "--quant", "nf", "--rank", "32", "--lr", "1e-4"])
    _, renamed = glue_run.resolve(["--task", "rte", "--quant", "nf", "--rank", "32", "--epochs", "3",
                                     "--grad_accum", "4"])  # the old names: accepted, with one line each
    assert (renamed["num_train_epochs"], renamed["gradient_accumulation_steps"]) == (3, 4)
    assert "epochs" not in renamed and "grad_accum" not in renamed


# ------------------------------------------------------------------------------------------------------ the data


def test_glue_tsv_fixtures_load():
    cola = load_glue(get_task("cola"), data_dir=str(DATA))  # finds DATA/CoLA, the GLUE folder name
    assert cola["train"].column_names == ["sentence", "label"] and len(cola["train"]) == 8
    assert cola["validation"]["label"] == [1, 0, 1, 0]
    mrpc = load_glue(get_task("mrpc"), data_dir=str(DATA / "MRPC"))  # header with a byte-order mark
    assert mrpc["validation"].column_names == ["sentence1", "sentence2", "label"]
    assert mrpc["train"][0]["sentence1"].startswith("The company") and mrpc["train"]["label"][:2] == [1, 0]
    stsb = load_glue(get_task("stsb"), data_dir=str(DATA))
    assert stsb["train"].features["label"].dtype == "float32"
    assert stsb["validation"]["label"] == pytest.approx([5.0, 0.2, 3.4, 1.0])


def test_csv_json_jsonl_with_label_names(tmp_path):
    rows = [{"premise": "a man sleeps", "hypothesis": "a man rests", "label": "entailment"},
            {"premise": "a man sleeps", "hypothesis": "a man runs", "label": 2}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "matched.json").write_text(json.dumps(rows))
    (tmp_path / "mismatched.csv").write_text("premise,hypothesis,label\nx y,y x,neutral\n")
    raw = load_glue(get_task("mnli"), train_file=str(tmp_path / "train.jsonl"),
                    validation_files=[str(tmp_path / "matched.json"), str(tmp_path / "mismatched.csv")])
    assert sorted(raw) == ["train", "validation_matched", "validation_mismatched"]
    assert raw["train"]["label"] == [0, 2] and raw["validation_mismatched"]["label"] == [1]


@pytest.mark.parametrize("content, message", [
    ("sentence1,sentence2,label\na,b,high\n", "label 'high' in row 1 is not a number"),
    ("sentence1,label\na,3.0\n", r"no column\(s\) \['sentence2'\]"),
])
def test_bad_stsb_files(tmp_path, content, message):
    path = str(tmp_path / "train.csv")
    (tmp_path / "train.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_glue(get_task("stsb"), train_file=path, validation_files=[path])


def test_bad_classification_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 0.5}\n')
    bad = str(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"label 0.5 in row 2 is not a cola label; use integers 0..1 or one of"):
        load_glue(get_task("cola"), train_file=bad, validation_files=[bad])
    (tmp_path / "broken.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", \n')
    with pytest.raises(ValueError, match="line 2: malformed JSON"):
        load_glue(get_task("cola"), train_file=str(tmp_path / "broken.jsonl"),
                  validation_files=[str(tmp_path / "broken.jsonl")])
    with pytest.raises(FileNotFoundError, match="no dev_matched.tsv"):
        load_glue(get_task("mnli"), data_dir=str(DATA / "MRPC"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue(get_task("cola"), train_file=str(tmp_path / "nope.tsv"), validation_files=[str(tmp_path / "x.tsv")])


def test_script_fails_before_loading_the_model(tmp_path):
    """Bad data fails before the model is touched (the model path does not even exist)."""
    (tmp_path / "train.csv").write_text("sentence,label\ngood,maybe\n")
    common = ["--quant", "nf", "--rank", "16", "--model", str(tmp_path / "no_model"),
              "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="label 'maybe' in row 1 is not a sst2 label"):
        train_glue.main(["--task", "sst2", *common, "--train_file", str(tmp_path / "train.csv"),
                         "--validation_file", str(tmp_path / "train.csv")])
    with pytest.raises(FileNotFoundError, match="--train_file .*missing.tsv' does not exist"):
        train_glue.main(["--task", "sst2", *common, "--train_file", str(tmp_path / "missing.tsv"),
                         "--validation_file", str(tmp_path / "train.csv")])
    with pytest.raises(FileNotFoundError, match="model path .*no_model' does not exist"):
        train_glue.main(["--task", "cola", *common, "--data_dir", str(DATA)])
    assert not (tmp_path / "o").exists()  # nothing is written before the model is loaded


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    """Through the real entry point: run_main turns the error into one 'error: ...' line and exit code 2."""
    base = [sys.executable, "-m", "scripts.train_glue", "--quant", "nf", "--data_dir", str(DATA)]
    cases = {
        "error: unknown GLUE task 'colaa'; choose one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli":
            [*base, "--task", "colaa", "--rank", "16"],
        "error: no row for {'task': 'cola', 'quant': 'nf', 'rank': 8} in the table; rows (task, quant, rank): ":
            [*base, "--task", "cola", "--rank", "8"],
        "error: argument --lora_dropout: invalid float value: 'abc' (train_glue.py --help lists the flags)":
            [*base, "--task", "cola", "--rank", "16", "--lora_dropout", "abc"],  # argparse's own: no usage block
        "error: argument --quant: invalid choice: 'foo'": [*base, "--task", "cola", "--rank", "16", "--quant", "foo"],
        "error: --train_file '": [*base, "--task", "cola", "--rank", "16", "--train_file", str(DATA)],  # a directory
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {expected: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for expected, cmd in cases.items()}
    for expected, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert stderr.strip().splitlines() == errors and len(errors) == 1 and errors[0].startswith(expected), stderr
        assert "is a directory, not a data file: pass the data file itself" in stderr or "train_file" not in expected


# ---------------------------------------------------------------------------------------------- end to end, CPU


def test_methods_quantize_and_wrap_as_documented(model_dir):
    """lora keeps the encoder, qlora fake-quantizes targets (<= 4 levels at uniform 2-bit), loftq/llmm run LoftQ."""
    task = get_task("mrpc")
    original = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    query = "deberta.encoder.layer.0.attention.self.query_proj"
    for method in ("lora", "qlora", "loftq", "llmm"):
        _, settings = glue_run.resolve(["--task", "mrpc", "--quant", "uniform", "--rank", "16", "--method", method,
                                          "--model", model_dir])
        _, model = glue_run.load_model(settings.model, task)
        model = glue_run.wrap_model(model, settings)
        base = model.get_submodule("base_model.model." + query).get_base_layer().weight
        levels = base.unique().numel()
        assert levels == (original.get_submodule(query).weight.unique().numel() if method == "lora" else 4), method
        assert all(s["k"] == (1 if method == "llmm" else 0) for layer in llmm_layers(model)
                   for s in layer.llmm_settings.values())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        for head in ("pooler", "classifier"):  # full precision, trained as a whole (PEFT modules_to_save)
            assert any(n.startswith(f"base_model.model.{head}.modules_to_save.") for n in trainable), head
        assert not any("pooler" in n and "lora_" in n for n in trainable), "the pooler is not adapted"
        assert not any(n.endswith("query_proj.base_layer.weight") for n in trainable)
        # embeddings: lora leaves them alone; the others quantize every table and give it a pair (qlora: A = 0)
        for table in ("embeddings.word_embeddings", "embeddings.position_embeddings", "encoder.rel_embeddings"):
            layer = model.get_submodule("base_model.model.deberta." + table)
            original_table = original.get_submodule("deberta." + table).weight
            if method == "lora":
                assert type(layer) is torch.nn.Embedding and torch.equal(layer.weight, original_table)
                continue
            assert isinstance(layer, LlmmEmbedding) and layer.get_base_layer().weight.unique().numel() <= 4, method
            assert (layer.lora_embedding_A["default"].abs().sum() == 0) == (method == "qlora"), method
            assert layer.lora_embedding_A["default"].requires_grad and not layer.get_base_layer().weight.requires_grad


def test_train_glue_end_to_end(runs, model_dir):
    for name in RUNS:
        out = runs / name
        assert {p.name for p in out.iterdir()} >= {"settings.json", "results.json", "adapter", "mean_adapter",
                                                  "curves.png"}, name
        settings = json.loads((out / "settings.json").read_text())
        results = json.loads((out / "results.json").read_text())
        assert results["complete"] and results["epochs"] and settings["versions"]["torch"]
        task = get_task(settings["task"])
        last = results["last"]
        assert last["train_loss"] is not None and results["best"] is not None
        dev = last["dev"][task.dev_splits[0]]
        assert set(task.metrics) <= set(dev)
        assert ({"nll", "brier", "ece"} <= set(dev)) != task.is_regression, name
        # the table's best-epoch figures recomputed from the outputs the run saved for that epoch
        assert outdirs.foreign_entries(out) == []  # every file is one --overwrite may replace
        best = json.loads((out / "predictions-best.json").read_text())
        assert (best["epoch"], best["step"]) == (results["best"]["epoch"], results["best"]["step"])
        for split in task.dev_splits:
            recomputed = glue_run.score(task, best[split]["outputs"], best[split]["labels"])
            assert recomputed == best[split]["metrics"] and recomputed.items() <= results["best"]["dev"][split].items()
        mean_config = json.loads((out / "mean_adapter" / "adapter_config.json").read_text())
        assert "k" not in mean_config and mean_config["r"] == 16
        with safe_open(str(out / "mean_adapter" / "adapter_model.safetensors"), "pt") as weights:
            assert not any("lora_llmm" in key for key in weights.keys())
    settings = json.loads((runs / "cola-llmm-mc" / "settings.json").read_text())
    assert (settings["bits"], settings["K"], settings["llmmscale"], settings["eval_noise"]) == (4, 1, 1000.0, "mc")
    assert json.loads((runs / "mrpc-qlora" / "settings.json").read_text())["K"] == 0
    # the Llmm adapter reloads onto the run's own quantized backbone, K checked; lora names the original model
    adapter = json.loads((runs / "cola-llmm-mc" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((runs / "cola-llmm-mc" / "backbone").resolve())
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
    model = load_llmm_model(base, str(runs / "cola-llmm-mc" / "adapter"), k=1)
    assert len(llmm_layers(model)) == 2 * 6  # the plain embedding pairs are not Llmm layers
    assert {type(m).__name__ for m in model.modules()} >= {"LlmmEmbedding"}
    lora = json.loads((runs / "cola-lora" / "adapter" / "adapter_config.json").read_text())
    assert lora["base_model_name_or_path"] == model_dir and not (runs / "cola-lora" / "backbone").exists()
    assert not any("embeddings" in t for t in lora["target_modules"])  # 16-bit LoRA leaves the embeddings alone


def test_refuses_a_used_output_dir(runs, model_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_glue.main([*RUNS["cola-lora"], *SMOKE, "--model", model_dir, "--data_dir", str(DATA),
                         "--output_dir", str(runs / "cola-lora")])


def test_glue_table_gathers_runs(runs, tmp_path, capsys):
    incomplete = tmp_path / "incomplete" / "results.json"
    incomplete.parent.mkdir()
    incomplete.write_text(json.dumps({"task": "cola", "complete": False}))
    text = glue_table.main([str(runs), str(incomplete.parent), "--output", str(tmp_path / "table.md")])
    lines = text.split("Seed statistics")[0].splitlines()
    assert lines[2] == "| Method | MRPC Acc/F1 | CoLA Mcc | STS-B P/S |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[4:] if line.startswith("| ")}
    assert list(rows) == ["lora full-precision r16", "qlora uniform 2-bit r16", "loftq nf 2-bit r16",
                          "llmm nf 4-bit r16", "llmm uniform 2-bit r16"]  # a tiny model: not LoftQ's DeBERTa
    assert "LoftQ's published rows (microsoft/deberta-v3-base) are left out: no run here fine-tunes that model." \
        in lines
    assert glue_report.same_model("/data/models/deberta-v3-base", "microsoft/deberta-v3-base")  # a local copy
    assert glue_report.same_model("quantized/deberta-v3-base-2bit-32rank", "microsoft/deberta-v3-base")  # _init.sh
    assert not glue_report.same_model("microsoft/deberta-v3-large", "microsoft/deberta-v3-base")
    assert not glue_report.same_model("runs/deberta-v3-base-mnli", "microsoft/deberta-v3-base")  # another model
    results = json.loads((runs / "cola-llmm-mc" / "results.json").read_text())
    assert results["seed"] == 0 and results["cell"]["eval_noise"] == "mc" and "seed" not in results["cell"]
    mcc = 100 * results["best"]["dev"]["validation"]["matthews_correlation"]
    assert rows["llmm nf 4-bit r16"].split(" | ")[2] == f"{mcc:.1f} (n=1)"
    assert (tmp_path / "table.md").read_text() == text + "\n" + cli.TABLE_MARK  # marked: a re-run replaces it
    assert "skipped (incomplete)" in capsys.readouterr().err


def test_train_glue_from_an_init_directory(model_dir, tmp_path):
    """An _init.sh directory is used as it is: Q stays, the adapters start from its LoftQ means, the head is fresh."""
    from safetensors.torch import load_file

    from scripts import quantize_model

    init = quantize_model.main(["--model", model_dir, "--save_dir", str(tmp_path / "q"), "--task_type", "seq_cls",
                                "--quant", "nf", "--bits", "2", "--rank", "16", "--lora_alpha", "16", "--K", "1",
                                "--loftq_iter", "1", "--dtype", "float32"])
    backbone = load_file(init / "model.safetensors")
    means = load_file(init / "llmm_init" / "adapter_model.safetensors")
    _, model = glue_run.load_model(str(init), get_task("cola"))
    _, settings = glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "16", "--model", str(init),
                                      "--data_dir", str(DATA / "CoLA")])
    assert settings["init_dir"] == str(init / "llmm_init")
    assert settings["loftq_iter"] == 1 and settings["loftq_svd"] == "truncated"  # the directory's, not the table's 5
    with pytest.raises(ValueError, match=r"quantized with loftq_iter=1 but --loftq_iter 5 was given: drop"):
        glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "16", "--model", str(init), "--loftq_iter",
                            "5"])
    wrapped = glue_run.wrap_model(model, settings)
    key = "deberta.encoder.layer.0.attention.self.query_proj"
    layer = wrapped.base_model.model.get_submodule(key)
    assert torch.equal(layer.get_base_layer().weight, backbone[f"{key}.weight"])  # not quantized a second time
    assert torch.equal(layer.lora_A["default"].weight, means[f"base_model.model.{key}.lora_A.weight"])
    assert layer.lora_llmm_A["default"].weight.shape[0] == settings["K"] == 1
    # _init.sh quantizes an encoder's embedding tables too (quantize_embeddings auto = on for seq_cls), with pairs
    report = json.loads((init / "quantize_report.json").read_text())
    assert report["settings"]["quantize_embeddings"] is True
    for table in ("deberta.embeddings.word_embeddings", "deberta.encoder.rel_embeddings"):
        assert report["layers"][table]["rel_error_loftq"] < report["layers"][table]["rel_error_q"]
        embedding = wrapped.base_model.model.get_submodule(table)
        assert torch.equal(embedding.get_base_layer().weight, backbone[f"{table}.weight"])
        assert torch.equal(embedding.lora_embedding_A["default"],
                           means[f"base_model.model.{table}.lora_embedding_A"])
    # The directory's head is the random one of its quantization: each run draws its own from its seed, in float32.
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        heads.append(glue_run.load_model(str(init), get_task("cola"), init_dir=True)[1].classifier.weight)
    assert not torch.equal(heads[0], backbone["classifier.weight"]) and not torch.equal(heads[0], heads[1])
    bf16 = quantize_model.main(["--model", model_dir, "--save_dir", str(tmp_path / "q16"), "--task_type", "seq_cls",
                                "--quant", "nf", "--bits", "2", "--rank", "16", "--lora_alpha", "16", "--K", "1",
                                "--loftq_iter", "1", "--dtype", "bfloat16"])
    with pytest.raises(FileExistsError, match="is an _init.sh directory .*: a training run never replaces one"):
        train_glue.main(["--task", "cola", "--quant", "nf", "--rank", "16", "--model", model_dir, "--data_dir",
                         str(DATA / "CoLA"), "--output_dir", str(bf16), "--overwrite", "--max_steps", "1"])
    assert (bf16 / "quantize_report.json").is_file()
    _, model16 = glue_run.load_model(str(bf16), get_task("cola"), init_dir=True)
    assert {p.dtype for p in model16.parameters()} == {torch.float32}
    for method in ("qlora", "lora"):
        with pytest.raises(ValueError, match=f"LoftQ directory: --method {method} needs the original checkpoint"):
            glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "16", "--model", str(init),
                                "--method", method])
    with pytest.raises(ValueError, match="quantized with bits=2 but the settings say 4"):
        glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "16", "--model", str(init), "--bits", "4"])


# ------------------------------------------------------------------------------------------ embedding adapters


TABLES = ["word_embeddings", "position_embeddings", "rel_embeddings"]


def embedding_model(quant: str = "nf", gaussian: bool = False, k: int = 1):
    """A tiny DeBERTa with LoftQ (2 bits, r = 8) on its linear layers and embedding tables; the original tables."""
    from peft import LoftQConfig

    model = tiny_deberta(0, 2)
    originals = {name: module.weight.detach().clone() for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Embedding) and name.split(".")[-1] in TABLES}
    config = LlmmConfig(r=8, lora_alpha=8, target_modules=DEBERTA_TARGETS + TABLES, k=k, loftq_method=quant,
                        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=2, loftq_iter=3),
                        gaussian_embeddings=gaussian, modules_to_save=["classifier", "pooler"])
    return get_llmm_model(model, config), originals


@pytest.mark.parametrize("quant", ALLOWED_METHODS)
def test_embedding_loftq_lowers_the_reconstruction_error(quant):
    """||W - (Q + g (BA)^T)|| < ||W - quant(W)|| for every table; the table the model reads is Q + g (BA)^T."""
    model, originals = embedding_model(quant)
    for name, original in originals.items():
        layer = model.base_model.model.get_submodule(name)
        assert isinstance(layer, LlmmEmbedding)
        plain = (original - fake_quantize(original, 2, quant)).norm()
        loftq = (original - layer.weight).norm()
        assert loftq < 0.9 * plain, (name, loftq.item(), plain.item())
        delta = (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T
        assert torch.allclose(layer.weight, layer.get_base_layer().weight + delta * layer.scaling["default"])


def test_a_gaussian_table_read_whole_is_the_table_looked_up():
    """At g = alpha / r = 2, a Gaussian embedding pair's ``weight`` (the table DeBERTa reads whole: rel_embeddings)
    gives the rows a lookup gives, for the mean network and for one draw of the noise."""
    from test_layer import randomize

    from llmm import seed_noise

    model = get_llmm_model(tiny_deberta(0, 2), LlmmConfig(r=4, lora_alpha=8, target_modules=TABLES, k=2,
                                                          gaussian_embeddings=True))
    randomize(model)
    word = model.base_model.model.deberta.embeddings.word_embeddings
    assert isinstance(word, LlmmEmbedding) and word.scaling["default"] == 2
    ids = torch.randint(5, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for mode in ("mean", "sample"):
        with torch.no_grad(), noise_mode(model, mode):
            seed_noise(model, 3)
            looked_up = word(ids)
            seed_noise(model, 3)
            whole = torch.nn.functional.embedding(ids, word.weight)
        torch.testing.assert_close(whole, looked_up, rtol=0, atol=1e-6)
        assert not torch.allclose(looked_up, word.get_base_layer()(ids), atol=1e-3)  # the pair adds to the table


def test_embedding_pairs_train_including_the_table_deberta_reads_directly():
    """One AdamW step: every table's pair (word / position: looked up; rel_embeddings: read as .weight) gets a
    gradient and moves; the quantized tables stay frozen. Gaussian pairs also train their directions."""
    for gaussian in (False, True):
        model, _ = embedding_model(gaussian=gaussian)
        model.train()
        pairs = {n: p for n, p in model.named_parameters() if "lora_embedding" in n or (".lora_llmm_" in n and any(
            t in n for t in TABLES))}
        assert len(pairs) == (12 if gaussian else 6) and all(p.requires_grad for p in pairs.values())
        before = {n: p.detach().clone() for n, p in pairs.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):  # the first step moves B (A's gradient is not zero either: LoftQ init)
            ids = torch.randint(5, 128, (4, 12), generator=generator)
            loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
            loss.backward()
            for name, parameter in pairs.items():
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            optimizer.step()
            optimizer.zero_grad()
        assert all(not torch.equal(before[n], p) for n, p in pairs.items())
        embeddings = [m for m in model.modules() if isinstance(m, LlmmEmbedding)]
        assert len(embeddings) == 3 and not any(p.requires_grad for m in embeddings
                                                for p in m.get_base_layer().parameters())
        # Llmm layers: 12 linear layers, plus the three tables when their pairs are Gaussian
        assert len(llmm_layers(model)) == 12 + 3 * gaussian
        with noise_mode(model, "mean"):
            model.eval()
            ids = torch.randint(5, 128, (2, 12), generator=generator)
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_plain_peft_embedding_adapter_is_still_refused():
    """Only llmm's embedding layer may be plain; any other LoRA layer without Llmm factors is an error."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_deberta(0, 2), LoraConfig(r=4, target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match=r"adapted layers without Llmm factors, over \['Embedding'\]"):
        llmm_layers(model)


def test_bert_tables_are_word_and_position_embeddings():
    """BERT (the quick start's MiniLM): word and position tables quantized with pairs, the token-type table not."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3))
    settings = GlueRun.of({"rank": 4, "lora_alpha": 4, "K": 1, "llmmscale": 400.0, "bits": 2, "quant": "nf",
                           "loftq_iter": 1, "method": "llmm", "init": "loftq", "quantize_embeddings": True,
                           "gaussian_embeddings": False, "eval_noise": "mean"})
    model = glue_run.wrap_model(bert, settings)
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, LlmmEmbedding)}
    assert wrapped == {"word_embeddings", "position_embeddings"}
    assert type(model.base_model.model.bert.embeddings.token_type_embeddings) is torch.nn.Embedding


def test_settings_for_embeddings():
    _, llmm_row = glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32"])
    assert llmm_row["quantize_embeddings"] and not llmm_row["gaussian_embeddings"]  # the paper's protocol
    assert llmm_row["backbone"] == "nf 2-bit"
    _, lora = glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32", "--method", "lora"])
    assert not lora["quantize_embeddings"]
    _, off = glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32", "--no-quantize_embeddings"])
    assert off["backbone"] == "nf 2-bit (fp embeddings)"
    with pytest.raises(ValueError, match="keeps the backbone in full precision"):
        glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32", "--method", "lora",
                            "--quantize_embeddings"])
    with pytest.raises(ValueError, match="--gaussian_embeddings true needs --method llmm"):
        glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32", "--method", "loftq",
                            "--gaussian_embeddings", "true"])
    with pytest.raises(ValueError, match="--method llmm with K = 0 is the --method loftq run: use --method loftq"):
        glue_run.resolve(["--task", "cola", "--quant", "nf", "--rank", "32", "--K", "0"])


# --------------------------------------------------------------------------------------- runs that reload exactly

PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

results = {}
for run, features, batch_size in json.load(open(sys.argv[1])):
    base = json.load(open(f"{run}/mean_adapter/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), f"{run}/mean_adapter")
    model.eval()
    model.base_model.model.deberta.encoder.rel_embeddings.merge()  # DeBERTa reads this table's weight directly
    collate = DataCollatorWithPadding(AutoTokenizer.from_pretrained(base))
    with torch.no_grad():
        outputs = [model(**collate(features[i:i + batch_size])).logits.float()
                   for i in range(0, len(features), batch_size)]
    outputs = torch.cat(outputs)
    results[run] = (outputs.squeeze(-1) if outputs.shape[-1] == 1 else outputs).tolist()  # STS-B: scores
assert not any(name == "llmm" or name.startswith(("llmm.", "scripts")) for name in sys.modules)
print(json.dumps(results))
"""


def test_saved_runs_reload_exactly(runs, tmp_path):
    """adapter/ (llmm, through scripts.eval_glue) and mean_adapter/ (plain PEFT in a process that never imports
    llmm) reproduce the run's final dev predictions bit for bit, on the backbone the run saved (LoftQ: llmm 4-bit;
    QLoRA: uniform 2-bit; STS-B: Gaussian embedding pairs; all with quantized embedding tables and their pairs)."""
    jobs, expected = [], {}
    for name in ("cola-llmm-mc", "mrpc-qlora", "stsb-llmm-mc"):
        run = runs / name
        final = json.loads((run / "predictions.json").read_text())["validation"]
        record = eval_glue.main([str(run)])
        assert record["splits"]["validation"]["outputs"] == final["outputs"], name
        assert record["splits"]["validation"]["metrics"] == final["metrics"], name
        assert json.loads((run / "eval" / "mean.json").read_text())["mode"] == "mean"
        settings = json.loads((run / "settings.json").read_text())
        task = get_task(settings["task"])
        tokenizer, _ = glue_eval.load_run(run, task)
        features = tokenize(load_glue(task, data_dir=str(DATA)), task, tokenizer, settings["max_length"])
        jobs.append([str(run), [{k: v for k, v in row.items() if k != "labels"} for row in features["validation"]],
                     settings["per_device_eval_batch_size"]])
        expected[str(run)] = final["outputs"]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(tmp_path / "jobs.json")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_a_run_given_relative_paths_is_evaluated_from_any_directory(model_dir, tmp_path, monkeypatch):
    """settings.json and the adapter record the run's local inputs (model, data files) by their real paths: eval_glue
    started elsewhere reloads the same predictions, and the same run resumed by its relative flags is the same run."""
    work = tmp_path / "work"
    shutil.copytree(model_dir, work / "tiny")
    shutil.copytree(DATA, work / "data")
    monkeypatch.chdir(work)
    flags = [*RUNS["cola-llmm-mc"], *SMOKE, "--model", "tiny", "--train_file", "data/CoLA/train.tsv",
             "--validation_file", "data/CoLA/dev.tsv", "--output_dir", "run"]
    train_glue.main(flags)
    settings = json.loads((work / "run" / "settings.json").read_text())
    assert settings["model"] == str(work / "tiny") and settings["validation_file"] == [str(work / "data/CoLA/dev.tsv")]
    assert train_glue.main([*flags, "--skip_if_complete"]) is None  # the typed paths name the recorded run
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    record = eval_glue.main([str(work / "run")])
    final = json.loads((work / "run" / "predictions.json").read_text())["validation"]
    assert record["splits"]["validation"]["outputs"] == final["outputs"]


def test_eval_glue_modes_and_files(runs, tmp_path):
    run = runs / "stsb-llmm-mc"  # regression, Gaussian embedding pairs
    mc = eval_glue.main([str(run), "--mode", "mc", "--mc_samples", "2", "--output", str(tmp_path / "mc.json")])
    assert mc["mc_samples"] == 2 and set(mc["splits"]["validation"]["metrics"]) == {"pearson", "spearmanr"}
    cola = runs / "cola-llmm-mc"
    dev = str(DATA / "CoLA" / "dev.tsv")
    sample = eval_glue.main([str(cola), "--mode", "sample", "--file", dev, "--output", str(tmp_path / "s.json")])
    entry = sample["splits"]["dev"]
    assert entry["file"] == dev and len(entry["outputs"]) == 4 and {"nll", "ece"} <= set(entry["metrics"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        eval_glue.main([str(cola), "--mode", "sample", "--file", dev, "--output", str(tmp_path / "s.json")])
    with pytest.raises(FileNotFoundError, match="is not a finished scripts.train_glue run"):
        eval_glue.main([str(tmp_path)])
    for kept in ("curves.png", "predictions-best.json"):  # a run's plot and figures are never an --output
        before = (cola / kept).read_bytes()
        with pytest.raises(ValueError, match="would replace what the command reads"):
            eval_glue.main([str(cola), "--output", str(cola / kept), "--overwrite"])
        assert (cola / kept).read_bytes() == before
    for flags, message in ((["--mode", "sample", "--mc_samples", "3"], "--mc_samples only applies to --mode mc"),
                           (["--seed", "1"], "the mean network has none")):  # no silently ignored flag
        with pytest.raises(ValueError, match=message):
            eval_glue.main([str(cola), *flags, "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
    broken = tmp_path / "broken"
    shutil.copytree(cola, broken)
    for content, message in (("{broken", "is not valid JSON"), ('{"rank": 0}', "has rank = 0, which must be")):
        (broken / "settings.json").write_text(content)
        with pytest.raises(ValueError, match=rf"settings.json'.* {message}.*re-run the training \(train_glue\)"):
            eval_glue.main([str(broken), "--output", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_eval_glue_mc_reproduces_the_training_runs_mc_dev_figures(model_dir, tmp_path):
    """Training's mc dev evaluation and eval_glue --mode mc draw the same N networks (network n: stream n of the
    run's seed) in the same precision: eval_glue on the saved run gives the recorded dev metrics and the outputs
    predictions-best.json holds, exactly."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    results = train_glue.main(["--task", "mrpc", "--quant", "nf", "--rank", "16", "--eval_noise", "mc",
                               "--mc_samples", "3", "--K", "2", *SMOKE, "--model", model_dir, "--data_dir", str(DATA),
                               "--output_dir", str(run)])
    record = eval_glue.main([str(run), "--mode", "mc"])
    assert (record["seed"], record["mc_samples"], record["noise_width"]) == (0, 3, 1.0)
    recorded = results["last"]["dev"]["validation"]
    assert {k: v for k, v in recorded.items() if k != "loss"} == record["splits"]["validation"]["metrics"]
    best = json.loads((run / "predictions-best.json").read_text())["validation"]
    assert best["outputs"] == record["splits"]["validation"]["outputs"]


def test_the_width_search_nll_at_the_chosen_width_is_eval_glues(model_dir, tmp_path):
    """The width search evaluates nll(m) as eval_glue --mode mc does (same networks, precision and formula): at the
    chosen m, which the saved adapter carries and eval_glue records, the two NLLs are equal."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    results = train_glue.main(["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--mc_samples", "2",
                               "--noise_width_search", "tfb", "--noise_width_grid", "0.5", "4", "32", *SMOKE,
                               "--model", model_dir, "--data_dir", str(DATA), "--output_dir", str(run)])
    search = results["noise_width_search"]
    chosen = search["chosen"]
    assert results["noise_width"] == chosen > 0
    record = eval_glue.main([str(run), "--mode", "mc"])
    assert record["noise_width"] == chosen
    assert dict(map(tuple, search["evaluations"]))[chosen] == record["splits"]["validation"]["metrics"]["nll"]


# ------------------------------------------------------------------------------------------- best epoch by F1


def test_mrpc_and_qqp_select_the_best_epoch_on_f1(tmp_path):
    """LoftQ's and the reference's run_glue.py: MRPC and QQP pick the epoch with the best F1, not accuracy."""
    assert (get_task("mrpc").main_metric, get_task("qqp").main_metric) == ("f1", "f1")
    assert get_task("cola").main_metric == "matthews_correlation" and get_task("rte").main_metric == "accuracy"
    for task in ("mrpc", "qqp"):
        history = [{"epoch": 1.0, "step": 10, "eval_validation_accuracy": 0.80, "eval_validation_f1": 0.84},
                   {"epoch": 2.0, "step": 20, "eval_validation_accuracy": 0.78, "eval_validation_f1": 0.86},
                   {"epoch": 3.0, "step": 30, "eval_validation_accuracy": 0.79, "eval_validation_f1": 0.85}]
        recorder = glue_run.ResultsRecorder(tmp_path, get_task(task), {"task": task})
        results = recorder.write(history, complete=True)
        assert results["main_metric"] == "f1" and results["best"]["epoch"] == 2.0 and results["last"]["epoch"] == 3.0
