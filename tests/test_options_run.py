"""The method's options through the multiple-choice run (scripts.train_mcq on a tiny Llama): the entropy term (lambda = 0
is the paper bit for bit, lambda > 0 trains and logs it), the width search after training (multiplier 1 reproduces the
mc evaluation bit for bit; the search records both rules and mc uses the chosen m, saved in the adapter), batched mc
equals sequential mc, per-example noise reaches the adapter, the table's variants and their rows, bad input."""

import json

import pytest
import torch
from test_mcq import DATA, make_tokenizer, tiny_causal_lm, write_mcq_run
from conftest import REPO_ROOT

from llmm.run import cli
from llmm.run import trainer as training

MODES = ("--eval_modes", "mean", "mc")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tokenizer = make_tokenizer()
    root = tmp_path_factory.mktemp("options")
    tiny_causal_lm(tokenizer).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    lines = [line for name in ("arc", "obqa", "winogrande") for line in
             (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")  # 11 questions: 8 to train on, 3 to validate
    return root


def argv(root, out, *extra):
    passes = [] if "map" in extra else ["--mc_samples", "3"]  # MAP's only mode, mean, samples nothing
    return ["--task", "arc_e", "--model_name_or_path", str(root / "tiny-llama"), "--train_data",
            str(root / "train.jsonl"), "--test_data", str(DATA / "arc.jsonl"), "--load_in_8bit", "false",
            "--dtype", "float32", "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3",
            "--save_steps", "3", *passes, "--learning_rate", "0.01", "--validation_size", "3",
            "--output_dir", str(out), *extra]


def train(root, out, *extra):
    from scripts import train_mcq

    return train_mcq.main(argv(root, out, *extra))


def metrics(results):
    return [(e["eval_set"], e["mode"], e["accuracy"], e["ece"], e["nll"], e["brier"]) for e in results["evaluations"]]


def adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_entropy_weight_zero_is_the_paper_bit_for_bit_and_a_positive_weight_trains_and_logs_it(tiny_dir, tmp_path,
                                                                                                monkeypatch):
    paper = train(tiny_dir, tmp_path / "paper", *MODES, "--entropy_weight", "0")
    with monkeypatch.context() as patch:  # the Trainer without the entropy hook at all: today's loss
        patch.setattr(training.LlmmTrainer, "compute_loss", lambda self, *args, **kwargs: self.task_loss(*args,
                                                                                                        **kwargs))
        plain = train(tiny_dir, tmp_path / "plain", *MODES)
    assert paper["train_loss"] == plain["train_loss"] and metrics(paper) == metrics(plain)
    same, other = adapter_weights(tmp_path / "paper"), adapter_weights(tmp_path / "plain")
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)
    assert not any("entropy" in log for log in paper["history"])

    lam = train(tiny_dir, tmp_path / "entropy", *MODES, "--entropy_weight", "1.0", "--entropy_warmup_ratio", "0.5")
    logs = [log for log in lam["history"] if "entropy" in log]
    assert [log["entropy_weight"] for log in logs] == [0.0, 0.5, 1.0]  # warm-up over ceil(0.5 * 3) = 2 steps
    assert logs[0]["task_loss"] == pytest.approx(logs[0]["loss"])  # lambda = 0 at step 0: the objective is the loss
    assert logs[1]["loss"] == pytest.approx(logs[1]["task_loss"] - 0.5 * logs[1]["entropy"], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(log["entropy"])) for log in logs)
    assert logs[-1]["entropy"] > logs[0]["entropy"]  # Z grew off zero, so did its entropy
    moved = adapter_weights(tmp_path / "entropy")
    directions = [k for k in moved if "lora_llmm" in k]
    assert directions and any(not torch.equal(moved[k], same[k]) for k in directions)
    assert lam["cell"]["entropy_weight"] == 1.0 and paper["cell"]["entropy_weight"] == 0.0  # cell-defining


def test_width_multiplier_one_reproduces_mc_and_the_search_records_both_rules_and_mc_uses_its_choice(
        tiny_dir, tmp_path):
    from scripts import test_mcq

    paper = train(tiny_dir, tmp_path / "paper", *MODES)
    assert paper["noise_width_search"] is None and paper["noise_width"] == 1.0
    one = train(tiny_dir, tmp_path / "one", *MODES, "--noise_width_search", "tfb", "--noise_width_tolerance", "1e9",
                "--noise_width_grid", "1.0")
    assert one["noise_width_search"]["chosen"] == one["noise_width_search"]["tfb"] == 1.0
    assert metrics(one) == metrics(paper)  # m = 1: today's mc evaluation, bit for bit
    assert one["cell"]["noise_width_search"] == "tfb" and paper["cell"]["noise_width_search"] == "none"

    found = train(tiny_dir, tmp_path / "nll", *MODES, "--noise_width_search", "nll")
    record = found["noise_width_search"]
    grid = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    tried = [m for m, _ in record["evaluations"]]
    assert tried[0] == 0.0 and set(grid) <= set(tried) and record["n_validation"] == 3
    nll = dict(map(tuple, record["evaluations"]))
    assert record["chosen"] == record["nll_min"] == min(nll, key=nll.get)
    base = nll[0.0]
    assert (nll[record["tfb"]] - base) <= 0.003 * base
    saved = json.loads((tmp_path / "nll" / "adapter" / "adapter_config.json").read_text())
    assert saved["noise_width"] == record["chosen"] == found["noise_width"]
    assert {e["noise_width"] for e in found["evaluations"]} == {record["chosen"]}
    assert metrics(found)[0] == metrics(paper)[0]  # the mean network is untouched
    again = test_mcq.main(["--runs", str(tmp_path / "nll"), "--output_dir", str(tmp_path / "nll-again")])
    assert metrics(again) == metrics(found)  # the reloaded adapter evaluates with the chosen m
    if record["chosen"] != 1.0:
        assert metrics(found)[1] != metrics(paper)[1]


def test_the_width_search_on_a_finished_run_equals_the_search_after_training(tiny_dir, tmp_path, capsys):
    """TFB needs no training: test_mcq --noise_width_search on a finished llmm run finds the same m and the same
    figures, in the same cell (variant llmm_tfb / llmm_nll), as the variant's run that searched after training."""
    from scripts import test_mcq

    train(tiny_dir, tmp_path / "llmm", *MODES, "--variant", "llmm")
    both = test_mcq.main(["--runs", str(tmp_path / "llmm"), "--noise_width_search", "tfb", "nll",
                          "--output_dir", str(tmp_path / "llmm-both")])  # one search, an evaluation per rule
    for index, rule in enumerate(("tfb", "nll")):
        trained = train(tiny_dir, tmp_path / rule, *MODES, "--variant", f"llmm_{rule}")
        searched = test_mcq.main(["--runs", str(tmp_path / "llmm"), "--noise_width_search", rule,
                                  "--output_dir", str(tmp_path / f"llmm-{rule}")])
        assert searched["noise_width_search"]["chosen"] == trained["noise_width_search"]["chosen"]
        assert searched["noise_width_search"]["evaluations"] == trained["noise_width_search"]["evaluations"]
        assert metrics(searched) == metrics(trained)
        assert [e["cell"] for e in searched["evaluations"]] == [e["cell"] for e in trained["evaluations"]]
        assert searched["evaluations"][0]["cell"]["variant"] == f"llmm_{rule}"
        half = len(both["evaluations"]) // 2
        assert metrics({"evaluations": both["evaluations"][index * half:(index + 1) * half]}) == metrics(trained)
    assert (tmp_path / "llmm-both" / "llmm_nll" / "reliability-arc_e.png").is_file()
    # in bfloat16 too: the search after training computes without the Trainer's bf16 autocast, as every evaluation
    trained = train(tiny_dir, tmp_path / "bf16", *MODES, "--variant", "llmm_nll", "--dtype", "bfloat16")
    searched = test_mcq.main(["--runs", str(tmp_path / "bf16"), "--noise_width_search", "nll",
                              "--output_dir", str(tmp_path / "bf16-again")])
    assert searched["noise_width_search"]["evaluations"] == trained["noise_width_search"]["evaluations"]
    train(tiny_dir, tmp_path / "pex", *MODES, "--variant", "llmm_pex")  # no table row has pex with a search
    test_mcq.main(["--runs", str(tmp_path / "pex"), "--noise_width_search", "tfb", "nll", "--output_dir",
                   str(tmp_path / "pex-both")])
    assert all((tmp_path / "pex-both" / rule / "reliability-arc_e.png").is_file() for rule in ("tfb", "nll"))
    train(tiny_dir, tmp_path / "map", "--eval_modes", "mean", "--method", "map")
    for runs, problem in [([tmp_path / "map"], "K = 0"), ([tmp_path / "llmm", tmp_path / "tfb"], "applies to one run")]:
        with pytest.raises(ValueError, match=problem):
            test_mcq.main(["--runs", *map(str, runs), "--noise_width_search", "tfb", "--output_dir",
                           str(tmp_path / "refused")])
        assert not (tmp_path / "refused").exists()


def test_batched_mc_equals_sequential_mc_through_the_recipe(tiny_dir, tmp_path, monkeypatch):
    from llmm.run.mcq import evaluate_sets
    from llmm.tasks import calibration as C
    from llmm.run import mcq_test as test_mcq

    batched = train(tiny_dir, tmp_path / "batched", *MODES, "--mc_batched", "true")
    mc = next(e for e in batched["evaluations"] if e["mode"] == "mc")
    assert mc["mc_batched"] is True
    settings = test_mcq.member_settings(test_mcq.parse_args(["--runs", str(tmp_path / "batched"), "--output_dir",
                                                             str(tmp_path / "x")]))[0]
    model, tokenizer = test_mcq.load_member(settings)
    from llmm.run.mcq import TABLE, load_all
    from llmm.run import tables

    _, sets = load_all(settings, tables.read_table(TABLE), train=False)
    original = C.predict
    calls = []

    def sequential(head, batches, mode, mc_samples=1, seed=None, batched=False):  # same streams, one network at a time
        calls.append((mode, seed, batched))
        return original(head, batches, mode, mc_samples, seed=seed, batched=False)

    monkeypatch.setattr(C, "predict", sequential)
    entries = evaluate_sets(model, tokenizer, _letters(tokenizer), sets, settings, None, "llmm", {})
    assert ("mc", settings["seed"], True) in calls  # the recipe asked for batched networks of the run's seed
    one = next(e for e in entries if e["mode"] == "mc" and e["eval_set"] == "arc_e")
    assert [one[k] for k in ("accuracy", "ece", "nll", "brier")] == [mc[k] for k in ("accuracy", "ece", "nll",
                                                                                       "brier")]
    plain = train(tiny_dir, tmp_path / "sequential", *MODES)  # mc_batched false: a speed option, the same networks
    one = next(e for e in plain["evaluations"] if e["mode"] == "mc" and e["eval_set"] == "arc_e")
    assert one["mc_batched"] is False
    assert [one[k] for k in ("accuracy", "ece", "nll", "brier")] == pytest.approx([mc[k] for k in (
        "accuracy", "ece", "nll", "brier")], rel=1e-6)


def _letters(tokenizer):
    from llmm.tasks.mcq import letter_token_ids

    return letter_token_ids(tokenizer, 5)


def test_per_example_noise_reaches_the_adapter_and_the_cell(tiny_dir, tmp_path):
    pex = train(tiny_dir, tmp_path / "pex", *MODES, "--variant", "llmm_pex")
    saved = json.loads((tmp_path / "pex" / "adapter" / "adapter_config.json").read_text())
    assert saved["noise_per_example"] is True and pex["cell"]["noise_per_example"] is True
    assert pex["cell"]["variant"] == "llmm_pex" and pex["method"] == "llmm"
    checkpoint = tmp_path / "pex" / "checkpoints" / "checkpoint-3"
    with pytest.raises(ValueError, match="was trained with noise_per_example=True but the settings say False"):
        train(tiny_dir, tmp_path / "pex", *MODES, "--variant", "llmm", "--resume_from_checkpoint", str(checkpoint))


def test_variants_set_the_options_and_the_table_shows_each_as_a_row_paired_with_map(tiny_dir, tmp_path):
    from llmm.run import mcq
    from scripts import mcq_table

    expected = {"map": ("map", False, 0.0, "none"), "mcdropout": ("mcdropout", False, 0.0, "none"),
                "llmm": ("llmm", False, 0.0, "none"), "llmm_pex": ("llmm", True, 0.0, "none"),
                "llmm_tfb": ("llmm", False, 0.0, "tfb"), "llmm_nll": ("llmm", False, 0.0, "nll"),
                "llmm_ent": ("llmm", False, 5e-4, "none")}
    cells = {}
    for variant, want in expected.items():
        settings = mcq.parse_settings(argv(tiny_dir, tmp_path / variant, "--variant", variant))
        assert (settings["method"], settings["noise_per_example"], settings["entropy_weight"],
                settings["noise_width_search"]) == want
        cells[variant] = mcq.run_cell(settings)
    script = (REPO_ROOT / "train_mcq.sh").read_text()
    assert all(name in script for name in expected) and '--variant "$method"' in script
    for seed in (1, 2, 3):
        for variant, cell in cells.items():
            modes = {("arc_e", "mean", 1): 0.5 + 0.01 * seed}
            if cell["method"] == "llmm":
                modes[("arc_e", "mc", 3)] = 0.52 + 0.01 * seed
            write_mcq_run(tmp_path / "runs", f"{variant}-{seed}", cell, seed, modes)
    text = mcq_table.main([str(tmp_path / "runs")])
    block = text.split("### Accuracy")[1].split("\n\n")[1]
    rows = [line.split(" | ")[0].strip("| ") for line in block.splitlines()[2:]]
    for variant in expected:
        assert any(row.startswith(f"{variant} fp32 ") for row in rows), (variant, rows)
    paired = text.split("Paired difference vs map")[1]
    for variant in ("llmm_pex", "llmm_tfb", "llmm_nll", "llmm_ent", "mcdropout"):
        assert f"| {variant} fp32 K" in paired, variant  # paired with map over three seeds
    assert "+2.0 [+2.0, +2.0] (n=3)" in paired.split("| llmm_tfb fp32 K2 mc N=3 |")[1].splitlines()[0]


@pytest.mark.parametrize("extra, problem", [
    (["--variant", "nope"], "unknown variant 'nope'"),
    (["--noise_width_search", "tfb", "--validation_size", "0"], "needs a validation split"),
    (["--variant", "llmm_tfb", "--method", "map"], "--method 'map' contradicts --variant llmm_tfb, which sets method"),
    (["--eval_modes", "mean", "mean"], "--eval_modes mean mean: name each mode once"),
    (["--entropy_weight", "-1"], "entropy_weight = -1.0 is out of range"),
    (["--noise_width_grid", "1", "0"], "noise_width_grid = [1.0, 0.0] is out of range"),
    (["--validation_size", "11"], "validation_size 11 leaves no training data"),
])
def test_bad_option_input_is_one_error_line_and_writes_nothing(tiny_dir, tmp_path, capsys, extra, problem):
    from scripts import train_mcq

    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: train_mcq.main(argv(tiny_dir, out, *extra)))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and problem in errors[0], errors
    assert not out.exists()


def test_glue_width_search_on_dev_is_recorded_and_saved_in_the_adapter(tmp_path):
    from test_glue import DATA as GLUE_DATA
    from test_glue import SMOKE, save_tiny_model

    from scripts import train_glue

    model_dir = save_tiny_model(tmp_path / "tiny_deberta")
    flags = ["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--mc_samples", "2", *SMOKE,
             "--model", model_dir, "--data_dir", str(GLUE_DATA)]
    train_glue.main([*flags, "--noise_width_search", "nll", "--output_dir", str(tmp_path / "cola")])
    results = json.loads((tmp_path / "cola" / "results.json").read_text())
    record = results["noise_width_search"]
    nll = dict(map(tuple, record["evaluations"]))
    assert record["split"] == "validation" and 0.0 in nll and record["chosen"] == min(nll, key=nll.get)
    saved = json.loads((tmp_path / "cola" / "adapter" / "adapter_config.json").read_text())
    assert saved["noise_width"] == record["chosen"] == results["noise_width"]
    assert results["cell"]["noise_width_search"] == "nll"
    with pytest.raises(ValueError, match="needs --method llmm"):
        train_glue.main([*flags, "--method", "loftq", "--noise_width_search", "tfb", "--output_dir",
                         str(tmp_path / "loftq")])
    assert not (tmp_path / "loftq").exists()
