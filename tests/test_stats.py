"""Seed statistics (llmm.stats) and the GLUE table on hand-made results with known medians and paired differences."""

import json

import numpy as np
import pytest

from llmm import stats
from scripts import glue_table
from llmm.run import glue_report, schema

CELL = {"task": "cola", "method": "llmm", "backbone": "nf 2-bit", "quant": "nf", "bits": 2, "rank": 32, "K": 1,
        "llmmscale": 600.0, "init": "loftq", "learning_rate": 5e-5, "eval_noise": "mean", "mc_samples": 10}
LOFTQ = {**CELL, "method": "loftq", "K": 0}


def write_run(root, name, cell, seed, mcc):
    folder = root / name
    folder.mkdir(parents=True)
    entry = {"dev": {"validation": {"matthews_correlation": mcc / 100}}}
    (folder / "results.json").write_text(json.dumps({"task": cell["task"], "complete": True, "seed": seed,
                                                     "cell": cell, "best": entry, "last": entry}))


def stat_rows(text):
    """{(label, task): [n, median, mean ± sd, difference]} from the seed-statistics table."""
    lines = text.split("Seed statistics")[1].splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and "---" not in line]
    return {(r[0], r[1]): r[3:] for r in rows[1:]}


def test_summary_and_bootstrap_against_numpy():
    assert stats.summarize([60.0, 61.0, 70.0, 59.0]) == pytest.approx(
        {"n": 4, "median": 60.5, "mean": 62.5, "sd": float(np.std([60, 61, 70, 59], ddof=1))})
    method = {0: 61.0, 1: 58.0, 2: 64.5, 3: 60.0, 7: 1.0}
    baseline = {0: 60.0, 1: 59.0, 2: 60.5, 3: 57.0, 9: 1.0}
    got = stats.paired_difference(method, baseline)
    differences = np.array([1.0, -1.0, 4.0, 3.0])  # seeds 0-3: the seeds both have
    rng = np.random.default_rng(stats.BOOTSTRAP_SEED)
    means = differences[rng.integers(0, 4, size=(stats.N_RESAMPLES, 4))].mean(axis=1)
    assert got["seeds"] == [0, 1, 2, 3] and got["n"] == 4 and got["mean"] == pytest.approx(1.75)
    assert (got["low"], got["high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert -1.0 <= got["low"] < 1.75 < got["high"] <= 4.0
    constant = stats.paired_difference({s: 50.0 + s for s in range(4)}, {s: 48.0 + s for s in range(4)})
    assert (constant["mean"], constant["low"], constant["high"]) == pytest.approx((2.0, 2.0, 2.0))
    assert stats.paired_difference({0: 1.0}, {1: 1.0}) is None
    assert stats.format_difference(constant) == "+2.0 [+2.0, +2.0] (n=4)"


def test_glue_table_medians_paired_interval_and_reference_row(tmp_path, capsys):
    llmm_scores, loftq_scores = [50.0, 52.0, 49.0, 58.0], [48.0, 50.0, 47.0, 56.0]  # llmm = loftq + 2 on every seed
    deberta = {"model": "microsoft/deberta-v3-base"}  # the published rows' model: they are shown beside it
    for seed, (a, b) in enumerate(zip(llmm_scores, loftq_scores)):
        write_run(tmp_path, f"llmm-{seed}", {**CELL, **deberta}, seed, a)
        write_run(tmp_path, f"loftq-{seed}", {**LOFTQ, **deberta}, seed, b)
    write_run(tmp_path, "loftq-9", {**LOFTQ, **deberta}, 9, 10.0)  # a seed llmm lacks: not in the pairing
    text = glue_table.main([str(tmp_path)])
    median_rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1].rstrip(" |")
                   for line in text.split("Seed statistics")[0].splitlines() if line.startswith("| ")}
    assert median_rows["llmm nf 2-bit r32"] == "51.0 (n=4)"  # median of 49, 50, 52, 58
    assert median_rows["loftq nf 2-bit r32"] == "48.0 (n=5)"
    assert median_rows["loftq nf 2-bit r32, published (microsoft/deberta-v3-base, LoftQ paper, Table 1 (NF2))"] \
        == "47.5"
    assert "are left out" not in text
    write_run(tmp_path / "older", "llmm-0", CELL, 0, 50.0)  # a cell from before runs recorded the default model
    assert "published (microsoft/deberta-v3-base" in glue_table.main([str(tmp_path / "older")])
    rows = stat_rows(text)
    sd = np.std(llmm_scores, ddof=1)
    assert rows[("llmm nf 2-bit r32", "cola")] == ["4", "51.0", f"52.2 ± {sd:.1f}", "+2.0 [+2.0, +2.0] (n=4)"]
    assert rows[("loftq nf 2-bit r32", "cola")][3] == "-"


def test_runs_that_differ_in_a_setting_are_never_pooled(tmp_path):
    """A mean-evaluated and an mc-evaluated run of the same seed are two rows with n=1, not one cell with n=2."""
    write_run(tmp_path, "mean", CELL, 0, 50.0)
    write_run(tmp_path, "mc", {**CELL, "eval_noise": "mc"}, 0, 60.0)
    write_run(tmp_path, "rte", {**CELL, "task": "rte", "learning_rate": 1e-4}, 0, 60.0)  # its own lr: no label
    (tmp_path / "rte" / "results.json").write_text((tmp_path / "rte" / "results.json").read_text().replace(
        "matthews_correlation", "accuracy"))
    rows = stat_rows(glue_table.main([str(tmp_path), "--no_reference"]))
    assert set(rows) == {("llmm nf 2-bit r32 (eval_noise=mean)", "cola"), ("llmm nf 2-bit r32 (eval_noise=mc)", "cola"),
                         ("llmm nf 2-bit r32 (eval_noise=mean)", "rte")}
    assert all(values[0] == "1" for values in rows.values())
    write_run(tmp_path, "mean-again", CELL, 0, 51.0)  # the same cell and seed twice: not two seeds
    with pytest.raises(ValueError, match="two runs of one cell with seed 0: they cannot be pooled"):
        glue_table.main([str(tmp_path)])


def test_a_results_file_without_its_cell_is_refused(tmp_path):
    write_run(tmp_path, "new", CELL, 0, 50.0)
    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"task": "cola", "complete": True, "method": "llmm", "seed": 0,
                               "best": {"dev": {"validation": {"matthews_correlation": 0.5}}}}))
    with pytest.raises(ValueError, match="has no 'cell'/'seed' record"):
        glue_table.main([str(tmp_path)])


def test_labels_show_only_the_settings_that_separate_rows():
    cells = [{**CELL, "learning_rate": 5e-5}, {**CELL, "quant": "uniform", "backbone": "uniform 2-bit",
                                                 "learning_rate": 1e-4}, {**CELL, "K": 2}]
    assert stats.distinguishing_fields(cells, glue_report.LABEL_FIELDS) == ["method", "backbone", "rank", "K"]
    searched = [{**CELL, "noise_width_search": "none"},  # the grid applies only with a search: absent here
                {**CELL, "noise_width_search": "nll", "noise_width_grid": [0.25, 1.0]}]
    assert stats.distinguishing_fields(searched, glue_report.LABEL_FIELDS)[-1] == "noise_width_search"
    assert stats.find_baseline(CELL, [LOFTQ, {**LOFTQ, "rank": 16}], "loftq") == (LOFTQ, 1)
    # the noise's settings: loftq (K = 0) cannot be given them, so an mc run is paired with loftq's mean; an older
    # loftq cell that recorded them is read without them (llmm.stats.canonical_cell): the same cell
    assert stats.find_baseline({**CELL, "eval_noise": "mc", "mc_samples": 4}, [LOFTQ], "loftq") == (LOFTQ, 1)
    older = stats.canonical_cell({**LOFTQ, "eval_noise": "mc"}, schema.GlueRun)
    assert older == stats.canonical_cell(LOFTQ, schema.GlueRun)
    # Gaussian embedding pairs exist only for llmm (loftq's are plain): such a run is still paired with loftq
    gaussian = {**CELL, "quantize_embeddings": True, "gaussian_embeddings": True}
    plain = {**LOFTQ, "quantize_embeddings": True, "gaussian_embeddings": False}
    assert stats.find_baseline(gaussian, [plain, {**plain, "quantize_embeddings": False}], "loftq") == (plain, 1)


def write_lm_run(root, name, cell, seed, **values):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"seed": seed, "cell": cell, **values}))


def test_lm_table_pairs_gsm8k_accuracy_and_loss_with_loftq(tmp_path):
    from scripts import lm_table

    trained = {"task": "gsm8k", "model": "llama-2-7b", "rank": 64, "learning_rate": 3e-4}
    llmm = {**trained, "method": "llmm", "K": 2, "model_name_or_path": "q/llama", "test_mode": "mean",
            "test_seed": 42, "test_mc_samples": 8}  # greedy decoding of the mean network: neither had an effect
    loftq = {**llmm, "method": "loftq", "K": 0}
    for seed in range(3):
        write_lm_run(tmp_path, f"llmm-{seed}", llmm, seed, accuracy=0.30 + 0.01 * seed)
        write_lm_run(tmp_path, f"loftq-{seed}", loftq, seed, accuracy=0.29 + 0.01 * seed)
        write_lm_run(tmp_path, f"mc-{seed}", {**llmm, "test_mode": "mc", "test_seed": 1}, seed, accuracy=0.5)
        write_lm_run(tmp_path, f"train-{seed}", {**loftq, "task": "alpaca"}, seed, eval_loss=1.0 + seed,
                     eval_perplexity=2.0)
    text = lm_table.main([str(tmp_path)])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in text.splitlines()
            if line.startswith("| ") and "---" not in line and not line.startswith("| Method")}
    assert rows["llmm llama-2-7b r64 (test_mode=mean)"] == ["3", "31.00", "31.00 ± 1.00",
                                                           "+1.00 [+1.00, +1.00] (n=3) |"]
    assert rows["llmm llama-2-7b r64 (test_mode=mc)"][-1].startswith("+20.00 [")  # vs loftq's mean (K = 0: no mc)
    assert "alpaca, held-out loss" in text and "| loftq llama-2-7b r64 | 3 | 2.000 | 2.000 ± 1.000 | - |" in text


def test_runs_linked_into_a_table_folder_are_read_each_once(tmp_path):
    """A table reads runs linked into its folder through their links, each real folder once: a link back up (a loop)
    adds nothing."""
    from scripts import lm_table

    cell = {"task": "alpaca", "model": "llama-2-7b", "rank": 64, "method": "loftq", "K": 0}
    for seed in range(2):
        write_lm_run(tmp_path / "runs", f"loftq-{seed}", cell, seed, eval_loss=1.0 + seed, eval_perplexity=2.0)
        (tmp_path / "table" / f"loftq-{seed}").parent.mkdir(exist_ok=True)
        (tmp_path / "table" / f"loftq-{seed}").symlink_to(tmp_path / "runs" / f"loftq-{seed}", target_is_directory=True)
    (tmp_path / "table" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert "| loftq llama-2-7b r64 | 2 | 1.500 | 1.500 ± 0.707 | - |" in lm_table.main([str(tmp_path / "table")])


def test_without_a_table_row_runs_of_two_model_paths_are_never_paired(tmp_path):
    """The model's paths may differ between a method and its baseline (an _init.sh directory, qlora's checkpoint)
    only when both name one table row; without --model, two paths are two models."""
    trained = {"task": "gsm8k", "model": None, "rank": 64, "learning_rate": 3e-4}
    llmm = {**trained, "method": "llmm", "K": 2, "model_name_or_path": "q/llama-7b"}
    loftq = {**llmm, "method": "loftq", "K": 0, "model_name_or_path": "q/llama-13b"}
    records = [{"task": "gsm8k", "seed": 0, "cell": cell, "value": 1.0} for cell in (llmm, loftq)]
    cells = [r["cell"] for r in records]
    assert stats.find_baseline(llmm, cells, "loftq") == (None, 0)
    named = [{**cell, "model": "llama-2-7b"} for cell in cells]
    assert stats.find_baseline(named[0], named, "loftq") == (named[1], 1)


def test_a_complete_run_with_an_undefined_metric_is_left_out_by_name_not_skipped(tmp_path):
    for seed, mcc in enumerate([50.0, 52.0, None]):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        entry = {"dev": {"validation": {"matthews_correlation": None if mcc is None else mcc / 100}}}
        (folder / "results.json").write_text(json.dumps({"task": "cola", "complete": True, "seed": seed,
                                                         "cell": CELL, "best": entry, "last": entry}))
    records, skipped = glue_report.gather([str(tmp_path)], "last")
    assert skipped == [] and len(records) == 3
    summary = stats.summarize([r["scores"][0] for r in records])
    assert summary["n"] == 2 and summary["median"] == pytest.approx(51.0) and len(summary["left_out"]) == 1
    assert "| 2 | 51.0 | 51.0 ± 1.4; 1 not finite left out: nan |" in glue_table.main([str(tmp_path),
                                                                                      "--no_reference"])


def test_a_run_directory_of_glue_s_old_vocabulary_pools_with_a_new_one(tmp_path, capsys):
    """Runs written before GLUE's settings took Hugging Face's names (batch_size, grad_accum, ...) table with runs
    written after: the same cell under today's names, two seeds of one row."""
    new = {"task": "cola", "method": "llmm", "backbone": "nf 2-bit", "rank": 16, "K": 1,
           "per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "lr_scheduler_type": "linear",
           "num_train_epochs": 60}
    old = {**{k: v for k, v in new.items() if k not in schema.RENAMED.values()}, "batch_size": 16, "grad_accum": 2,
           "lr_scheduler": "linear", "epochs": 60}
    write_run(tmp_path, "old", old, 0, 50.0)
    write_run(tmp_path, "new", new, 1, 52.0)
    rows = stat_rows(glue_table.main([str(tmp_path), "--no_reference"]))
    assert list(rows) == [("llmm nf 2-bit r16", "cola")] and rows[("llmm nf 2-bit r16", "cola")][0] == "2"


def test_a_cell_holds_every_setting_that_acted(tmp_path, monkeypatch):
    """A run records every setting its entry point offers, given or at its default: a table row that leaves
    lora_alpha out and one that says 16 are one cell, and a field it does not offer (GLUE's dtype) is no part of it.
    The tables then leave out what had no effect (its field's ``applies`` false) and read a whole number of a float
    setting as a float; a test that asks the machine is not re-tested."""
    from llmm.run import glue

    text = glue.TABLE.read_text().replace("{task: cola, quant: nf, rank: 16, lora_alpha: 16,",
                                          "{task: cola, quant: nf, rank: 16,")
    (tmp_path / "glue.yaml").write_text(text)
    monkeypatch.setattr(glue, "TABLE", tmp_path / "glue.yaml")
    row = ["--task", "cola", "--quant", "nf", "--rank", "16", "--method", "loftq"]
    given, left_out = (glue.resolve(row + extra)[1] for extra in (["--lora_alpha", "16"], []))
    assert stats.cell_of(given) == stats.cell_of(left_out) and stats.cell_of(left_out)["lora_alpha"] == 16
    assert "dtype" not in stats.cell_of(left_out) and stats.cell_of(left_out)["max_steps"] is None
    acted = stats.canonical_cell(stats.cell_of(left_out), schema.GlueRun)
    assert not {"llmmscale", "eval_noise", "mc_samples", "noise_width_grid", "entropy_weight"} & set(acted)  # K = 0
    assert stats.canonical_cell(acted, schema.GlueRun) == acted
    assert stats.canonical_cell({**LOFTQ, "lora_alpha": 16.0}, schema.GlueRun)["lora_alpha"] == 16.0
    assert type(stats.canonical_cell({**LOFTQ, "lora_alpha": 16}, schema.GlueRun)["lora_alpha"]) is float
    lora = stats.canonical_cell({**LOFTQ, "method": "lora", "init": "lora", "loftq_iter": 5}, schema.GlueRun)
    assert "loftq_iter" not in lora and lora["quant"] == "nf"  # quant and bits name the row: GLUE's nf and
    steps = stats.canonical_cell({**CELL, "max_steps": 100, "num_train_epochs": 3}, schema.GlueRun)  # uniform rows
    assert "num_train_epochs" not in steps and steps["max_steps"] == 100
    paged = stats.canonical_cell({**CELL, "optim": "paged_adamw_8bit"}, schema.GlueRun)
    assert paged["optim"] == "paged_adamw_8bit"  # without CUDA here, but the run may have had it
    assert "lora_alpha" not in stats.canonical_cell(CELL, schema.GlueRun)  # an old cell: not filled in
    # a GSM8K test's own settings (test_*): greedy decoding draws no sample, so its temperature is no part of it
    tested = stats.canonical_cell({"K": 2, "test_mode": "mean", "test_temperature": 0.7, "test_mc_samples": 8,
                                   "test_seed": 42}, schema.Gsm8kTestRun, prefix="test_")
    assert tested == {"K": 2, "test_mode": "mean"}  # its seed too (a setting of no table role: the same rule)
    sampled = {"K": 2, "test_mode": "mc", "test_mc_samples": 8, "test_seed": 1}
    assert stats.canonical_cell(sampled, schema.Gsm8kTestRun, prefix="test_") == sampled


def test_runs_equal_in_effect_pool_and_pair(tmp_path):
    """A K = 0 baseline that recorded the noise's settings pools with one that did not, and an entropy-trained llmm
    run is paired with it (the entropy's weight had no effect on the baseline)."""
    write_run(tmp_path, "loftq-0", {**LOFTQ, "llmmscale": 600.0, "entropy_weight": 0.0, "eval_noise": "mc"}, 0, 45.0)
    write_run(tmp_path, "loftq-1", {**LOFTQ, "llmmscale": 400.0}, 1, 47.0)
    write_run(tmp_path, "llmm-0", {**CELL, "entropy_weight": 0.0}, 0, 50.0)
    write_run(tmp_path, "entropy-0", {**CELL, "entropy_weight": 0.01}, 0, 49.0)
    rows = stat_rows(glue_table.main([str(tmp_path), "--no_reference"]))
    assert rows[("loftq nf 2-bit r32 (entropy_weight=n/a)", "cola")][:2] == ["2", "46.0"]
    assert rows[("llmm nf 2-bit r32 (entropy_weight=0.0)", "cola")][3].startswith("+5.0 (n=1")
    assert rows[("llmm nf 2-bit r32 (entropy_weight=0.01)", "cola")][3].startswith("+4.0 (n=1")


def test_a_setting_without_effect_takes_the_settings_that_follow_it_along():
    acted = stats.canonical_cell({**LOFTQ, "entropy_weight": 0.5, "entropy_floor": 1e-6, "entropy_warmup_ratio": 0.1},
                                 schema.GlueRun)
    assert not {"entropy_weight", "entropy_floor", "entropy_warmup_ratio"} & set(acted)  # K = 0: no entropy term
    causal = {"task": "gsm8k", "method": "llmm", "K": 2, "load_in_4bit": False, "prepare_kbit_training": True,
              "optim": "paged_adamw_32bit"}
    acted = stats.canonical_cell(causal, schema.CausalLMRun)
    assert "prepare_kbit_training" not in acted and acted["optim"] == "paged_adamw_32bit"  # CUDA: not known here
    assert "prepare_kbit_training" in stats.canonical_cell({**causal, "load_in_4bit": True}, schema.CausalLMRun)


def test_labels_tell_an_absent_setting_from_a_null_one_and_the_closest_baseline_is_paired():
    recorded, older = {**LOFTQ, "data_dir": None}, LOFTQ
    assert "data_dir" in stats.distinguishing_fields([recorded, older], glue_report.LABEL_FIELDS)
    assert (stats.label_part(recorded, "data_dir"), stats.label_part(older, "data_dir")) == ("data_dir=None",
                                                                                             "data_dir=n/a")
    full = {**LOFTQ, "weight_decay": 0.0}  # an older baseline cell without weight_decay matches too
    assert stats.find_baseline({**CELL, "weight_decay": 0.0}, [LOFTQ, full], "loftq") == (full, 1)
    assert stats.find_baseline(CELL, [LOFTQ, full], "loftq") == (None, 2)  # both hold as much of it: ambiguous


def test_a_tie_between_baseline_rows_is_named_in_the_table(tmp_path):
    """Two loftq rows match an llmm row that lacks the setting they differ in: its Δ says so, not a bare '-'."""
    for name, cell in (("llmm", CELL), ("loftq-a", {**LOFTQ, "weight_decay": 0.0}),
                       ("loftq-b", {**LOFTQ, "weight_decay": 0.1})):
        write_run(tmp_path, name, cell, 0, 50.0)
    rows = stat_rows(glue_table.main([str(tmp_path), "--no_reference"]))
    assert rows["llmm nf 2-bit r32 (weight_decay=n/a)", "cola"][3] == "- (ambiguous: 2 baseline rows match)"


def test_a_run_of_no_table_row_is_labelled_by_its_models_directory():
    from llmm.run import lm_report

    own = {"method": "llmm", "model": None, "model_name_or_path": "/x/quantized/my-llama-4bit-16rank/", "rank": 16}
    assert lm_report.label(own, []) == "llmm my-llama-4bit-16rank r16"
    assert lm_report.label({**own, "model": "llama-2-7b"}, []) == "llmm llama-2-7b r16"  # a row names itself


def test_an_input_is_one_cell_however_its_path_was_typed(tmp_path, monkeypatch):
    """A local file given relatively, absolutely or through a link is one input, so its runs pool (an older cell that
    recorded it as typed too, read where the table runs); a hub id, a table row's name (even beside a directory of
    that name) or a path that does not exist here is kept as given."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "gsm8k.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    (tmp_path / "link").symlink_to(tmp_path / "data")
    for row in ("llama-2-7b", "obqa"):
        (tmp_path / row).mkdir()
    monkeypatch.chdir(tmp_path)
    real = str((tmp_path / "data" / "gsm8k.jsonl").resolve())
    causal = (schema.CausalLMRun,)
    cells = [stats.cell_of({"method": "llmm", "model": "llama-2-7b", "data": data,
                            "model_name_or_path": "meta-llama/Llama-2-7b-hf"}, causal)
             for data in ("data/gsm8k.jsonl", str(tmp_path / "data" / "gsm8k.jsonl"), "link/gsm8k.jsonl")]
    assert cells[0] == cells[1] == cells[2] and cells[0]["data"] == real
    assert (cells[0]["model"], cells[0]["model_name_or_path"]) == ("llama-2-7b", "meta-llama/Llama-2-7b-hf")
    assert stats.cell_of({"validation_file": ["data/gsm8k.jsonl", "gone.tsv"]}, (schema.GlueRun,))[
        "validation_file"] == [real, "gone.tsv"]
    assert stats.cell_of(schema.GlueRun.of({"model": "llama-2-7b"}))["model"] == str(tmp_path / "llama-2-7b")
    ood = stats.fileio.real_inputs({"ood": ["obqa", "data/gsm8k.jsonl"]}, (schema.McqRun,))["ood"]
    assert ood == ["obqa", real]  # a task row stays a row
    older = {"method": "llmm", "data": "data/gsm8k.jsonl"}  # recorded as typed by an earlier version
    assert stats.canonical_cell(older, schema.CausalLMRun)["data"] == real