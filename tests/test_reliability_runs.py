"""Reliability through the entry points, as a user runs them (``main([...])`` under ``run_main``, one ``error:`` line,
exit 2, nothing written or removed), on a tiny Llama and the tests/data multiple-choice files."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_mcq import DATA, tiny_dir, tokenizer, train_argv  # noqa: F401  (fixtures)
from test_safety import ENV, cli, tree

from llmm.run.cli import disk_full
from llmm import outdirs
from scripts import eval_glue, mcq_table, test_gsm8k, test_mcq, train_mcq


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):  # noqa: F811
    """A finished map run (one step, a checkpoint) and a data folder, read by every case and never changed."""
    root = tmp_path_factory.mktemp("reliability")
    run = root / "run"
    train_mcq.main(train_argv(tiny_dir, run, "--method", "map", "--max_steps", "1", "--save_steps", "1",
                              "--eval_steps", "1", "--eval_modes", "mean"))
    outdirs.release_all()  # as run_main does at the end of a command
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((DATA / "arc.jsonl").read_text())
    return root, run, data


def refused(main, argv, capsys, root, *needles):
    """The command exits 2 with one error line holding every needle, and changes nothing under ``root``."""
    before = tree(root)
    code, line = cli(main, argv, capsys)
    assert code == 2 and all(needle in line for needle in needles), line
    assert tree(root) == before
    return line


# --- no command writes over its inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["run", "run/adapter", "."])
def test_test_mcq_never_writes_over_the_run_it_evaluates(world, capsys, monkeypatch, output):
    root, run, _ = world
    monkeypatch.chdir(root)
    refused(test_mcq.main, ["--runs", "run", "--output_dir", output, "--overwrite"], capsys, root, "--output_dir",
            "--runs 'run'", "outside its inputs")


def test_test_mcq_never_replaces_the_backbone_or_data_its_run_names(world, tmp_path, capsys):
    _, run, data = world
    copy, backbone = tmp_path / "run", tmp_path / "backbone"
    shutil.copytree(run, copy)
    settings = json.loads((copy / "settings.json").read_text())
    shutil.copytree(settings["model_name_or_path"], backbone)
    settings["model_name_or_path"] = str(backbone)
    (copy / "settings.json").write_text(json.dumps(settings))
    refused(test_mcq.main, ["--runs", str(copy), "--output_dir", str(backbone), "--overwrite"], capsys, tmp_path,
            "is the runs' model_name_or_path")


def test_test_mcq_checks_the_adapters_before_writing(world, tmp_path, capsys):
    _, run, _ = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused(test_mcq.main, ["--runs", str(copy), "--output_dir", str(tmp_path / "e")], capsys, tmp_path,
            "truncated or corrupt")


def test_test_gsm8k_never_replaces_the_run_holding_its_adapter(world, capsys):
    root, run, _ = world
    refused(test_gsm8k.main, ["--adapter", str(run / "adapter"), "--output_dir", str(run), "--overwrite",
                              "--data", str(DATA.parent / "gsm8k.jsonl")], capsys, root,
            f"--output_dir '{run}' contains --adapter")


def test_test_gsm8k_never_replaces_the_backbone_its_adapter_names(world, tmp_path, capsys):
    _, run, _ = world
    adapter, backbone = tmp_path / "adapter", tmp_path / "backbone"
    shutil.copytree(run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    shutil.copytree(json.loads((run / "settings.json").read_text())["model_name_or_path"], backbone)
    config["base_model_name_or_path"] = str(backbone)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    refused(test_gsm8k.main, ["--adapter", str(adapter), "--output_dir", str(backbone), "--overwrite",
                              "--data", str(DATA.parent / "gsm8k.jsonl")], capsys, tmp_path,
            "is --model_name_or_path")


def test_eval_glue_never_writes_over_a_runs_results(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"task": "cola", "seed": 1, "mc_samples": 2}))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "results.json").write_text("{}")
    refused(eval_glue.main, [str(run), "--output", str(run / "results.json"), "--overwrite"], capsys, tmp_path,
            "--output", "lies inside RUN_DIR")


def test_mcq_table_never_writes_over_a_runs_results(world, capsys):
    root, run, _ = world
    refused(mcq_table.main, [str(run), "--output", str(run / "results.json")], capsys, root, "lies inside")


@pytest.mark.parametrize("table", ["glue_table", "lm_table"])
def test_the_other_tables_never_write_over_a_runs_results(table, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    main = importlib.import_module(f"scripts.{table}").main
    refused(main, [str(run), "--output", str(run / "results.json")], capsys, tmp_path, "lies inside")


def test_a_table_replaces_its_own_output_not_a_users_file(world, tmp_path, capsys):
    root, run, _ = world
    table = tmp_path / "table.md"
    first = mcq_table.main([str(run), "--output", str(table)])
    assert table.read_text().startswith(first) and mcq_table.main([str(run), "--output", str(table)]) == first
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    refused(mcq_table.main, [str(run), "--output", str(notes)], capsys, tmp_path, "no llmm table wrote it",
            "--overwrite")
    mcq_table.main([str(run), "--output", str(notes), "--overwrite"])
    published = tmp_path / "published.yaml"
    published.write_text((REPO_ROOT / "configs" / "mcq_published.yaml").read_text())
    refused(mcq_table.main, [str(run), "--output", str(published), "--published", str(published), "--overwrite"],
            capsys, tmp_path, "--output", "is --published")
    plot = next(run.glob("*.png"))  # a run's own file: not replaced even with --overwrite
    refused(mcq_table.main, [str(root), "--output", str(plot), "--overwrite"], capsys, root, "lies inside paths",
            "would replace what the command reads")


def test_eval_glue_never_writes_over_the_runs_data_or_backbone(tmp_path, capsys):
    run, data, backbone = tmp_path / "run", tmp_path / "data", tmp_path / "backbone"
    for folder in (run / "adapter", data, backbone):
        folder.mkdir(parents=True)
    (data / "dev.tsv").write_text("sentence\tlabel\n")
    (backbone / "config.json").write_text("{}")
    (run / "settings.json").write_text(json.dumps({"task": "cola", "seed": 1, "data_dir": str(data)}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(backbone)}))
    for output, needle in ((data / "dev.tsv", "the run's data_dir"), (backbone / "config.json", "base model")):
        refused(eval_glue.main, [str(run), "--output", str(output), "--overwrite"], capsys, tmp_path, needle)


def test_train_mcq_never_replaces_its_own_training_data(tiny_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data"  # a prepare script's output: recognisably llmm's, so --overwrite would replace it
    data.mkdir()
    (data / "train.jsonl").write_text((DATA / "arc.jsonl").read_text())
    (data / "prepare_report.json").write_text("{}")
    argv = train_argv(tiny_dir, data, "--method", "map", "--overwrite")
    argv[argv.index("--train_data") + 1] = str(data / "train.jsonl")
    refused(train_mcq.main, argv, capsys, tmp_path, "contains --train_data")


def test_train_gsm8k_never_replaces_the_init_directory_it_reads(tiny_dir, tmp_path, capsys):  # noqa: F811
    from scripts import quantize_model, train_gsm8k

    quantize_model.main(["--model", str(tiny_dir), "--save_dir", str(tmp_path), "--rank", "4", "--bits", "4",
                         "--K", "2", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "float32"])
    outdirs.release_all()
    init = tmp_path / "tiny-llama-4bit-4rank"  # an _init.sh directory other runs depend on
    refused(train_gsm8k.main, ["--model_name_or_path", str(init), "--output_dir", str(init), "--overwrite",
                               "--data", str(DATA.parent / "gsm8k.jsonl"), "--max_steps", "1", "--rank", "4", "--eval_split", "heldout", "--eval_size", "2",
                               "--lora_alpha", "16"], capsys, tmp_path,
            "--output_dir", "is --model_name_or_path")
    refused(train_mcq.main, train_argv(init, tmp_path / "run", "--init", "lora", "--rank", "4"), capsys, tmp_path,
            "an _init.sh directory brings LoftQ means; for --init lora pass the original checkpoint")


# --- --overwrite replaces only what llmm wrote ---------------------------------------------------------------------

@pytest.mark.parametrize("foreign", ["my_notes.txt", "user_data/notes.txt"])
def test_overwrite_through_an_entry_point_refuses_a_users_files(world, tmp_path, capsys, foreign):
    _, run, _ = world
    out = tmp_path / "eval"
    (out / "results.json").parent.mkdir()
    (out / "results.json").write_text("{}")
    (out / foreign).parent.mkdir(exist_ok=True)
    (out / foreign).write_text("mine")
    refused(test_mcq.main, ["--runs", str(run), "--output_dir", str(out), "--overwrite"], capsys, tmp_path,
            foreign.split("/")[0], "which llmm did not write")


def test_overwrite_of_a_symlinked_output_dir_is_one_line_naming_it(world, tmp_path, capsys):
    _, run, _ = world
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "results.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    refused(test_mcq.main, ["--runs", str(run), "--output_dir", str(tmp_path / "link"), "--overwrite"], capsys,
            tmp_path, f"'{tmp_path / 'link'}'", "symbolic link")


def test_train_mcq_sh_refuses_one_output_dir_for_every_run(tmp_path):
    launch = tmp_path / "launch"
    launch.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'launched'}\n")
    launch.chmod(0o755)
    env = {**ENV, "TASKS": "arc_e", "METHODS": "map llmm", "SEEDS": "1", "LAUNCH": str(launch),
           "OUT": str(tmp_path / "runs")}
    done = subprocess.run(["bash", str(REPO_ROOT / "train_mcq.sh"), "--output_dir", str(tmp_path / "x")], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "--output_dir" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "launched").exists()


# --- test_mcq input checks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("twice", ["same", "spelled"])
def test_an_ensemble_of_one_run_twice_is_refused(world, tmp_path, capsys, twice):
    _, run, _ = world
    other = str(run) if twice == "same" else f"{run}/../{run.name}/"
    code, line = cli(test_mcq.main, ["--runs", str(run), other, "--output_dir", str(tmp_path / "e")], capsys)
    assert code == 2 and "twice" in line and not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", ["-1", "0"])
def test_max_eval_samples_below_one_is_refused(world, tmp_path, capsys, value):
    _, run, _ = world
    code, line = cli(test_mcq.main, ["--runs", str(run), "--output_dir", str(tmp_path / "e"),
                                     "--max_eval_samples", value], capsys)
    assert code == 2 and "--max_eval_samples" in line and not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_batch_size_below_one_names_the_flag(world, tmp_path, capsys, value):
    _, run, _ = world
    code, line = cli(test_mcq.main, ["--runs", str(run), "--output_dir", str(tmp_path / "e"),
                                     "--per_device_eval_batch_size", value], capsys)
    assert code == 2 and "--per_device_eval_batch_size" in line and not (tmp_path / "e").exists()


@pytest.mark.parametrize("argv, problem", [
    (["--eval_modes", "mc"], "evaluation mode(s) ['mc'] sample the Llmm noise, which the run"),
    (["--mc_samples", "3"], "--mc_samples only applies to eval modes mc and dropout"),
    (["--eval_modes", "mean", "dropout"], "eval mode 'dropout' needs dropout in the adapters, which the run"),
    (["--noise_width_tolerance", "0.5"], "--noise_width_tolerance only applies to a width search"),
    (["--noise_width_search", "tfb", "tfb"], "names a rule twice")])
def test_test_mcq_refuses_what_a_map_run_would_ignore(world, tmp_path, capsys, argv, problem):
    root, run, _ = world
    refused(test_mcq.main, ["--runs", str(run), "--output_dir", str(tmp_path / "e"), *argv], capsys, root, problem)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("argv, problem", [
    (["--mode", "mc"], "evaluation mode(s) ['mc'] sample the Llmm noise, which this adapter (K = 0) does not have: "
                       "use --mode mean"),
    (["--mc_samples", "3"], "--mc_samples 3 has no effect on this run: it applies only with --mode mc"),
    (["--seed", "3"], "greedy decoding of the mean network draws nothing")])
def test_test_gsm8k_refuses_what_it_would_ignore(world, tmp_path, capsys, argv, problem):
    root, run, _ = world
    refused(test_gsm8k.main, ["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "e"), "--data",
                              str(DATA.parent / "gsm8k.jsonl"), *argv], capsys, root, problem)
    assert not (tmp_path / "e").exists()


def test_train_mcq_held_out_noise_is_mean_or_sample(tiny_dir, tmp_path, capsys):  # noqa: F811
    code, line = cli(train_mcq.main, train_argv(tiny_dir, tmp_path / "r", "--eval_noise", "mc"), capsys)
    assert code == 2 and "eval_noise = 'mc' is out of range" in line and not (tmp_path / "r").exists()


def test_test_mcq_names_another_familys_run(world, tmp_path, capsys):
    _, run, _ = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "settings.json").write_text(json.dumps({"task": "cola", "method": "llmm", "eval_steps": 0}))  # GLUE's
    code, line = cli(test_mcq.main, ["--runs", str(copy), "--output_dir", str(tmp_path / "e")], capsys)
    assert code == 2 and "it is another family's run" in line and "pass a train_mcq run directory" in line


@pytest.mark.parametrize("content", ["[1, 2]", "{}", "drop:K", "dtype:float64", "K:-1"])
def test_a_runs_bad_settings_json_is_one_line_naming_it(world, tmp_path, capsys, content):
    _, run, _ = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    settings = json.loads((copy / "settings.json").read_text())
    if content == "drop:K":
        settings.pop("K")
        (copy / "settings.json").write_text(json.dumps(settings))
    elif ":" in content:  # a value out of its field's range
        name, value = content.split(":")
        settings[name] = json.loads(value) if value.lstrip("-").isdigit() else value
        (copy / "settings.json").write_text(json.dumps(settings))
    else:
        (copy / "settings.json").write_text(content)
    code, line = cli(test_mcq.main, ["--runs", str(copy), "--output_dir", str(tmp_path / "e")], capsys)
    assert code == 2 and "settings.json" in line and not (tmp_path / "e").exists()


# --- seeds, batch sizes, steps: one line naming the flag ---------------------------------------------------------------

def test_a_seed_beyond_two_to_the_32_names_the_flag(world, tiny_dir, tmp_path, capsys):  # noqa: F811
    code, line = cli(train_mcq.main, train_argv(tiny_dir, tmp_path / "r", "--seed", str(2**32)), capsys)
    assert code == 2 and "--seed" in line and "4294967295" in line and not (tmp_path / "r").exists()


def test_eval_steps_zero_is_refused(world, tiny_dir, tmp_path, capsys):  # noqa: F811
    argv = train_argv(tiny_dir, tmp_path / "r")
    argv[argv.index("--eval_steps") + 1] = "0"
    code, line = cli(train_mcq.main, argv, capsys)
    assert code == 2 and "eval_steps" in line and not (tmp_path / "r").exists()


def test_a_data_file_that_is_a_directory_is_named_as_such(world, tiny_dir, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "train.jsonl"
    folder.mkdir()
    argv = train_argv(tiny_dir, tmp_path / "r")
    argv[argv.index("--train_data") + 1] = str(folder)
    code, line = cli(train_mcq.main, argv, capsys)
    assert code == 2 and "directory" in line and "does not exist" not in line and "No such file" not in line


def test_a_full_disk_at_a_checkpoint_is_recognised():
    error = RuntimeError("[enforce fail at inline_container.cc:858] . unexpected pos 3328 vs 3216")
    assert disk_full(error)


def test_export_mean_adapter_of_an_unknown_adapter_is_a_value_error(tmp_path):
    from conftest import tiny_llama

    from llmm import LlmmConfig, export_mean_adapter, get_llmm_model

    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="other"):
        export_mean_adapter(model, str(tmp_path / "m"), adapter_name="other")


def test_a_newline_in_a_file_name_keeps_the_error_on_one_line(tmp_path):
    missing = tmp_path / "bad\nname.jsonl"
    done = subprocess.run([sys.executable, "-m", "scripts.mcq_table", str(missing)], env=ENV, cwd=REPO_ROOT,
                          capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines[-1].startswith("error:") and "bad\\nname" in lines[-1]
    assert os.linesep not in lines[-1]


def test_mc_dropout_out_of_range_names_mc_dropout(tiny_dir, tmp_path, capsys):  # noqa: F811
    code, line = cli(train_mcq.main, train_argv(tiny_dir, tmp_path / "r", "--method", "mcdropout", "--mc_dropout",
                                                "1"), capsys)
    assert code == 2 and "--mc_dropout" in line and not (tmp_path / "r").exists()


def test_a_malformed_settings_json_is_named(world, tmp_path, capsys):
    _, run, _ = world
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "settings.json").write_text("{broken")
    code, line = cli(test_mcq.main, ["--runs", str(copy), "--output_dir", str(tmp_path / "e")], capsys)
    assert code == 2 and str(copy / "settings.json") in line


@pytest.mark.parametrize("choices", [["a", "a", "b"], ["Sport", "sport ", "b"], ["a", None, "b"]])
def test_a_bad_training_record_is_one_line_before_anything_is_written(tiny_dir, tmp_path, capsys,  # noqa: F811
                                                                      choices):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "x1", "question": "q", "choices": choices, "answer": 0}) + "\n")
    argv = train_argv(tiny_dir, tmp_path / "r")
    argv[argv.index("--train_data") + 1] = str(data)
    code, line = cli(train_mcq.main, argv, capsys)
    assert code == 2 and f"{data}, record 1 (id 'x1'): field 'choices'" in line and not (tmp_path / "r").exists()
