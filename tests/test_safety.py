"""Nothing is lost: guarded --overwrite, exclusive locks, rename-or-fail publish, orphans, the divergence guard, and
the resume rules (README "Long runs"). Every case runs in a throwaway temporary directory, never the checkout.

    python -m pytest tests/test_safety.py -q
"""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_glue import model_dir  # noqa: F401  (the tiny DeBERTa fixture)
from test_resume import glue_argv, gsm8k_argv, llama_dir  # noqa: F401  (the tiny Llama fixture)

from llmm.run import adapters, checkpoints, tables
from llmm.run.cli import run_main
from conftest import LLAMA_TARGETS, REPO_ROOT, tiny_llama
from llmm import LlmmConfig, get_llmm_model, noise_source, outdirs, save_llmm_adapter
from llmm.outdirs import PARTIAL_MARKER, RUN_MARKER, atomic_dir
from scripts import quantize_model, quickstart, test_gsm8k, train_glue, train_gsm8k, train_nlg
from llmm.run import glue as glue_run
from llmm.run import trainer as training

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": f"{REPO_ROOT / 'src'}{os.pathsep}{REPO_ROOT}"}


def cli(main, argv, capsys) -> tuple[int, str]:
    """(exit code, the one error line) of an entry point run as its command line runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and [line for line in lines if "error:" in line] == [lines[-1]], lines[-5:]
    return exit_info.value.code, lines[-1]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def hold_lock_elsewhere(directory: Path) -> int:
    """Lock ``directory`` through a separate open file description: to flock, that is another holder."""
    fd = os.open(directory.parent / f".{directory.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def let_go(fd: int, directory: Path) -> None:
    (directory.parent / f".{directory.name}.lock").unlink()
    os.close(fd)


# --- --overwrite removes only what llmm wrote -----------------------------------------------------------------------

@pytest.fixture
def stand(tmp_path, monkeypatch):
    """A throwaway working directory that looks like a run directory (so only the protection rules can save it),
    inside a throwaway $HOME."""
    home = tmp_path / "home"
    work = home / "work" / "here"
    work.mkdir(parents=True)
    for folder in (home, home / "work", work):
        (folder / "settings.json").write_text("{}")
        (folder / "precious.txt").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


@pytest.mark.parametrize("path, reason", [
    ("", "empty string"), (".", "current directory"), ("./", "current directory"), ("..", "one above it"),
    ("../..", "home directory"), ("../../..", "one above it"), ("~", "home directory"), ("/", "file system root"),
])
def test_overwrite_never_removes_protected_directories(stand, path, reason):
    target = os.path.expanduser(path) if path else path
    before = tree(stand)
    with pytest.raises((FileExistsError, ValueError), match=reason):
        outdirs.prepare_output_dir(target, overwrite=True)
    assert tree(stand) == before


def test_overwrite_refuses_a_git_repository_and_foreign_directories(tmp_path):
    repo, foreign, ours = tmp_path / "repo", tmp_path / "thesis", tmp_path / "run"
    for folder, files in ((repo, (".git/HEAD", "settings.json")), (foreign, ("thesis.tex",)),
                          (ours, ("settings.json", "checkpoint-1/trainer_state.json"))):
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("x")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="it is a git repository"):
        outdirs.prepare_output_dir(repo, overwrite=True)
    with pytest.raises(FileExistsError, match="not a directory llmm wrote"):
        outdirs.prepare_output_dir(foreign, overwrite=True)
    assert tree(tmp_path) == before
    outdirs.prepare_output_dir(ours, overwrite=True)  # an llmm run directory is replaced
    assert sorted(p.name for p in ours.iterdir()) == [RUN_MARKER]
    outdirs.prepare_output_dir(ours, overwrite=True)  # and again: the marker makes it llmm's even before settings.json


def test_a_glue_run_s_tensorboard_logs_are_its_own(tmp_path):
    """--report_to tensorboard: the Trainer logs to <output_dir>/runs/, GLUE's run directory itself; the driver's
    --overwrite of an interrupted run must be able to replace it."""
    out = tmp_path / "seed0"
    (out / "runs" / "Dec06_12-00-00_host").mkdir(parents=True)
    (out / "runs" / "Dec06_12-00-00_host" / "events.out.tfevents.1.host").write_text("x")
    (out / RUN_MARKER).touch()
    assert outdirs.foreign_entries(out) == []
    outdirs.prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER]


def test_overwrite_replaces_a_width_search_s_own_per_rule_plots_and_nothing_foreign(tmp_path):
    out = tmp_path / "search"  # test_mcq --noise_width_search tfb nll: one plot directory per rule, named by variant
    for name in ("results.json", "llmm_tfb/reliability-bbcnews.png", "llmm_nll/reliability-bbcnews.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / RUN_MARKER).touch()
    (out / "llmm_ent").mkdir()  # interrupted before its plot: empty
    assert outdirs.foreign_entries(out) == []
    (out / "llmm_nll" / "notes.txt").write_text("mine")  # a user's file inside: the directory is not llmm's
    (out / "thesis").mkdir()
    (out / "thesis" / "reliability-old.png").symlink_to(out / "results.json")
    assert outdirs.foreign_entries(out) == ["llmm_nll/", "thesis/"]
    with pytest.raises(FileExistsError, match="'llmm_nll/', 'thesis/'"):
        outdirs.prepare_output_dir(out, overwrite=True)
    (out / "llmm_nll" / "notes.txt").unlink()
    (out / "thesis" / "reliability-old.png").unlink()
    outdirs.prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [RUN_MARKER]


def test_a_user_s_file_inside_an_llmm_folder_is_found_and_kept(tmp_path):
    """--overwrite looks inside the run's own folders (eval/, checkpoints/...): a file the user put there is named, and
    nothing is replaced; a resume's clean-up (remove_ours) removes llmm's stale scores and keeps the user's file."""
    out = tmp_path / "run"
    for name in ("settings.json", "eval/mean.json", "eval/mine.txt", "checkpoints/checkpoint-2/trainer_state.json",
                 "checkpoints/checkpoint-2/notes.md", "runs/Dec07_host/events.out.tfevents.1.host"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    assert outdirs.foreign_entries(out) == ["checkpoints/checkpoint-2/notes.md", "eval/mine.txt"]
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="'checkpoints/checkpoint-2/notes.md', 'eval/mine.txt'"):
        outdirs.prepare_output_dir(out, overwrite=True)
    assert tree(tmp_path) == before
    assert outdirs.remove_ours(out / "eval") == (["mean.json"], ["mine.txt"])
    assert [path.name for path in (out / "eval").iterdir()] == ["mine.txt"]
    (out / "eval" / "mine.txt").unlink()
    (out / "eval" / "mc.json").write_text("x")
    assert outdirs.remove_ours(out / "eval") == (["mc.json"], []) and not (out / "eval").exists()  # gone with it
    other = tmp_path / "other-run" / "test-greedy-mean"  # a link to another run's scores: not followed
    other.mkdir(parents=True)
    (other / "predictions.jsonl").write_text("x")
    (out / "test-greedy-mean").symlink_to(other)
    assert outdirs.remove_ours(out / "test-greedy-mean") == ([], ["test-greedy-mean"])
    assert (other / "predictions.jsonl").is_file()


def test_what_a_run_s_folders_may_hold_and_what_they_may_not(tmp_path):
    """What the Trainer and accelerate write into checkpoints (FSDP1's optimizer.bin, DCP parts, an interrupted save's
    hidden temporary files) is llmm's; a user's folder of llmm-like names with folders inside, or a hidden .metadata
    folder, is not."""
    out = tmp_path / "run"
    for name in ("settings.json", "checkpoints/checkpoint-2/optimizer.bin", "checkpoints/checkpoint-2/optimizer_0/"
                 ".metadata", "checkpoints/checkpoint-2/optimizer_0/__0_0.distcp",
                 "checkpoints/checkpoint-2/.llmm_noise_rng_0.pt.tmp", "checkpoints/checkpoint-2/.llmm_loss_sum.json.x1",
                 "runs/Dec07_host/1733/events.out.tfevents.1.host"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    assert outdirs.foreign_entries(out) == []
    for name in ("notes/2024/table.md", "notes/config.json", ".metadata/x"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    assert outdirs.foreign_entries(out) == [".metadata/", "notes/"]


def test_what_counts_as_llmm_s(tmp_path):
    run, plain = tmp_path / "run", tmp_path / "plain"
    for folder in (run / "backbone", plain / "backbone"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (run / RUN_MARKER).touch()
    assert outdirs.recognisably_ours(run / "backbone")  # inside a marked run directory (in-process LoftQ's Q)
    assert not outdirs.recognisably_ours(plain / "backbone")  # a model directory of someone else's
    assert outdirs.recognisably_ours(tmp_path / "run") and outdirs.recognisably_ours(tmp_path / "empty") is False
    (tmp_path / "empty").mkdir()
    assert outdirs.recognisably_ours(tmp_path / "empty")  # nothing to lose


ENTRY_POINTS = {  # every entry point that takes an output directory, with arguments that reach its check
    "train_gsm8k": (train_gsm8k.main, lambda w, out: gsm8k_argv(w["llama"], out, "--max_steps", "1")),
    "train_nlg": (train_nlg.main, lambda w, out: [
        "--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", "--model_name_or_path", str(w["llama"]),
        "--init", "lora", "--load_in_4bit", "false", "--dtype", "float32", "--data",
        str(REPO_ROOT / "tests/data/alpaca.jsonl"), "--eval_size", "2", "--output_dir", out]),
    "train_glue": (train_glue.main, lambda w, out: glue_argv(w["deberta"], out, "--max_steps", "1")),
    "test_gsm8k": (test_gsm8k.main, lambda w, out: [
        "--adapter", str(w["adapter"]), "--data", str(REPO_ROOT / "tests/data/gsm8k.jsonl"), "--load_in_4bit",
        "false", "--dtype", "float32", "--output_dir", out]),
    "quickstart": (quickstart.main, lambda w, out: ["--model", str(w["deberta"]), "--output_dir", out]),
}


@pytest.fixture(scope="module")
def models(llama_dir, model_dir, tmp_path_factory):  # noqa: F811
    adapter = tmp_path_factory.mktemp("adapter") / "adapter"
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=8, lora_alpha=16, k=2, target_modules=LLAMA_TARGETS))
    model.peft_config["default"].base_model_name_or_path = str(llama_dir)
    save_llmm_adapter(model, str(adapter))
    return {"llama": llama_dir, "deberta": model_dir, "adapter": adapter}


@pytest.mark.parametrize("out", ["", "."])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_no_entry_point_removes_the_working_directory(stand, models, capsys, entry, out):
    """The reported `--output_dir "" --overwrite` and `--output_dir . --overwrite`: one line, nothing removed."""
    main, argv = ENTRY_POINTS[entry]
    before = tree(stand)
    code, line = cli(main, [*argv(models, out), "--overwrite"], capsys)
    assert code == 2 and re.search(r"empty string|output_dir = ''|current directory", line), line
    assert tree(stand) == before


@pytest.mark.parametrize("path", ["", ".", ".."])
def test_the_python_api_never_replaces_protected_directories(stand, path):
    from llmm import export_mean_adapter

    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=1, target_modules=["q_proj"]))
    before = tree(stand)
    for save in (save_llmm_adapter, export_mean_adapter):
        with pytest.raises((FileExistsError, ValueError), match="empty string|current directory or one above it"):
            save(model, path, overwrite=True)
    assert tree(stand) == before


def test_every_table_row_is_inside_the_declared_ranges():
    """The schema and configs/ agree: no table row is rejected by the checks every CLI runs."""
    for table_file in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        table = tables.read_yaml(table_file)
        if "rows" not in table:
            continue
        for row in tables.table_rows(table):
            adapters.check_settings(row)


# --- locks, rename-or-fail, orphans ---------------------------------------------------------------------------------

def test_a_second_process_gets_one_line_while_the_first_holds_the_run(llama_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    fd = hold_lock_elsewhere(out)
    try:
        code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "1"), capsys)
        assert code == 2 and "in use by another process" in line and "wait for it to finish" in line
    finally:
        let_go(fd, out)
    assert not out.exists()
    out.mkdir()
    (out / outdirs.RUN_MARKER).touch()  # the first run's directory, in progress: in use, not 'not empty'
    fd = hold_lock_elsewhere(out)
    try:
        code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "1"), capsys)
        assert code == 2 and line.endswith("wait for it to finish, or choose another directory"), line
    finally:
        let_go(fd, out)


def test_the_lock_is_held_for_the_life_of_the_process_and_released_by_its_death(tmp_path):
    """A real second process takes the lock; ours is refused until that process is killed with SIGKILL."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('outdirs', {str(REPO_ROOT / 'src/llmm/outdirs.py')!r})\n"
        "outdirs = importlib.util.module_from_spec(spec); spec.loader.exec_module(outdirs)\n"
        f"outdirs.acquire({str(out)!r}); print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert outdirs.locked_by_other(out)
        with pytest.raises(outdirs.DirectoryLocked, match="in use by another process"):
            outdirs.prepare_output_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not outdirs.locked_by_other(out)  # the kernel released it; the stale lock file blocks no one
    outdirs.prepare_output_dir(out)
    outdirs.release_all()
    assert not (tmp_path / ".run.lock").exists()


def test_publish_is_rename_or_fail(tmp_path):
    """Another writer's directory that appears while we write is kept; ours is dropped with an error."""
    out = tmp_path / "adapter"
    with pytest.raises(FileExistsError, match="appeared while this was written"):
        with atomic_dir(out) as tmp:
            (Path(tmp) / "adapter_config.json").write_text("mine")
            out.mkdir()
            (out / "adapter_config.json").write_text("theirs")
    assert (out / "adapter_config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary directory, no lock file left
    with atomic_dir(out, overwrite=True) as tmp:  # --overwrite replaces it: renamed aside, then removed
        (Path(tmp) / "adapter_config.json").write_text("mine")
    assert (out / "adapter_config.json").read_text() == "mine" and not (out / PARTIAL_MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_orphans_of_killed_writes_are_removed_or_named(tmp_path, caplog):
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=1, target_modules=["q_proj"]))
    ours, unknown = tmp_path / ".adapter.k1ll3d", tmp_path / ".adapter.backup"
    for orphan in (ours, unknown):
        orphan.mkdir()
        (orphan / "adapter_model.safetensors").write_bytes(b"half")
    (ours / PARTIAL_MARKER).touch()
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    assert not ours.exists() and unknown.is_dir()
    assert str(unknown) in caplog.text and "so kept" in caplog.text
    fd = hold_lock_elsewhere(tmp_path / "adapter")  # a live writer's temporary directory is never touched
    try:
        with pytest.raises(outdirs.DirectoryLocked):
            save_llmm_adapter(model, str(tmp_path / "adapter"), overwrite=True)
    finally:
        let_go(fd, tmp_path / "adapter")


def test_a_second_init_with_the_same_name_fails_instead_of_replacing(llama_dir, tmp_path, capsys):  # noqa: F811
    argv = ["--model", str(llama_dir), "--save_dir", str(tmp_path), "--rank", "8", "--bits", "4", "--loftq_iter",
            "1", "--dtype", "float32"]
    orphan = tmp_path / f".{Path(llama_dir).name}-4bit-8rank.killed"
    orphan.mkdir()
    (orphan / PARTIAL_MARKER).touch()
    first = quantize_model.main(argv)
    assert not orphan.exists()  # a killed _init.sh's temporary directory is gone
    before = tree(first)
    fd = hold_lock_elsewhere(first)  # a second _init.sh running: one line, before loading anything
    try:
        code, line = cli(quantize_model.main, [*argv, "--overwrite"], capsys)
        assert code == 2 and "in use by another process" in line
    finally:
        let_go(fd, first)
    code, line = cli(quantize_model.main, [*argv, "--quant", "uniform"], capsys)  # no --overwrite: refused
    assert code == 2 and "exists and is not empty" in line
    assert tree(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


# --- divergence ---------------------------------------------------------------------------------------------------

def adapter_tensors(checkpoint: Path) -> dict:
    return load_file(checkpoint / "adapter_model.safetensors")


def test_non_finite_gradients_are_never_applied_nor_checkpointed(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Finite loss, NaN gradients at step 2 (the reported --learning_rate 1e6 --max_grad_norm 0 case, made
    deterministic): the update is not applied, no checkpoint-2, checkpoint-1 is named good after a read-back."""
    original = training.LlmmTrainer.training_step

    def nan_gradients_at_step_2(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step + 1 == 2:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(training.LlmmTrainer, "training_step", nan_gradients_at_step_2)
    applied = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: applied.append(1), raising=True)
    out = tmp_path / "run"
    code, line = cli(train_glue.main, glue_argv(model_dir, out, "--max_steps", "3", "--max_grad_norm", "0"), capsys)
    assert code == 3 and line.startswith("error: gradients are not finite (NaN or inf) at step 2, the update was "
                                         "not applied; stopped, the last good checkpoint is ")
    assert str(out / "checkpoint-1") in line and "--learning_rate" in line
    assert len(applied) == 1  # step 1 only
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]


def test_an_update_that_overflows_the_parameters_is_never_checkpointed(llama_dir, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
    """Finite loss and gradients, but the update of step 2 leaves an inf in the adapter: stopped before its
    checkpoint (the Trainer saves after the step)."""
    original = torch.optim.AdamW.step
    calls = []

    def overflowing_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "3", "--max_grad_norm", "0"),
                     capsys)
    assert code == 3 and line.startswith("error: the update of step 2 made the adapter's parameters non-finite "
                                         "(not checkpointed); stopped, the last good checkpoint is ")
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    assert checkpoints.checkpoint_is_finite(out / "checkpoints" / "checkpoint-1") and not (out / "adapter").exists()


def test_huge_learning_rate_without_clipping_leaves_only_finite_checkpoints(llama_dir, tmp_path, capsys):  # noqa: F811
    """The reported run: --learning_rate 1e6 --max_grad_norm 0 keeps a finite loss while the gradients turn NaN."""
    out = tmp_path / "run"
    code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "4", "--learning_rate", "1e6",
                                                  "--max_grad_norm", "0"), capsys)
    found = re.search(r"^error: (?:gradients are not finite|training loss is \S+) .*at step (\d+)", line)
    assert code == 3 and found, line
    step = int(found.group(1))
    kept = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in kept] == [f"checkpoint-{step - 1}"]  # save_total_limit 1; none of the step
    assert f"the last good checkpoint is '{kept[0]}'" in line
    assert checkpoints.checkpoint_is_finite(kept[0])


def test_under_ddp_every_process_stops_at_the_same_step(llama_dir, tmp_path):  # noqa: F811
    """torchrun with 2 processes: the flags are all-reduced, so both stop before the same optimizer step (no hang)."""
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "scripts.train_gsm8k",
                          *gsm8k_argv(llama_dir, out, "--max_steps", "4", "--learning_rate", "1e6",
                                      "--max_grad_norm", "0", "--gradient_accumulation_steps", "1")],
                         cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    # One error line per process; the two processes may write them into one line of the shared stream.
    lines = re.findall(r"error: .*?a resume keeps this run.s settings", run.stdout + run.stderr)
    assert run.returncode != 0 and len(lines) == 2, (run.stdout + run.stderr)[-3000:]
    steps = {re.search(r"at step (\d+)", line).group(1) for line in lines}
    assert len(steps) == 1 and all("stopped" in line for line in lines)
    assert all(checkpoints.checkpoint_is_finite(c) for c in (out / "checkpoints").glob("checkpoint-*"))
    assert not (out / "adapter").exists()


def test_only_a_finite_checkpoint_is_named_good(tmp_path):
    for step, value in ((1, 1.0), (2, float("nan"))):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.full((2,), value)}, folder / "adapter_model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert checkpoints.checkpoint_is_finite(tmp_path / "checkpoint-1")
    assert not checkpoints.checkpoint_is_finite(tmp_path / "checkpoint-2")
    torch.save({"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, tmp_path / "checkpoint-1" / "optimizer.pt")
    assert not checkpoints.checkpoint_is_finite(tmp_path / "checkpoint-1")


# --- resume -------------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def test_a_run_killed_during_export_resumes_without_an_extra_step(llama_dir, tmp_path, monkeypatch):  # noqa: F811
    from llmm.run import causal_lm

    full, killed = tmp_path / "full", tmp_path / "killed"
    train_gsm8k.main(gsm8k_argv(llama_dir, full, "--max_steps", "2"))
    with monkeypatch.context() as patch:
        patch.setattr(causal_lm, "save_run", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            train_gsm8k.main(gsm8k_argv(llama_dir, killed, "--max_steps", "2"))
    steps = []
    original = training.LlmmTrainer.training_step
    monkeypatch.setattr(training.LlmmTrainer, "training_step",
                        lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    results = train_gsm8k.main(gsm8k_argv(llama_dir, killed, "--max_steps", "2", "--resume_from_checkpoint"))
    assert steps == [] and results["global_step"] == 2
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (full, killed))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((killed / "results.json").read_text())["eval_loss"] == \
        json.loads((full / "results.json").read_text())["eval_loss"]


def test_a_run_resumed_to_more_steps_follows_the_longer_schedule_from_its_first_new_step(llama_dir, tmp_path):  # noqa: F811
    """Resuming a 2-step run with --max_steps 4: steps 3 and 4 take the learning rates of a 4-step run, not the
    rate the 2-step schedule ended at (0), and end where the 4-step run does (both schedules warm up for 1 step)."""
    schedule = ["--lr_scheduler_type", "linear", "--warmup_ratio", "0.25"]
    longer = train_gsm8k.main(gsm8k_argv(llama_dir, tmp_path / "four", "--max_steps", "4", *schedule))
    train_gsm8k.main(gsm8k_argv(llama_dir, tmp_path / "two", "--max_steps", "2", *schedule))
    resumed = train_gsm8k.main(gsm8k_argv(llama_dir, tmp_path / "two", "--max_steps", "4", *schedule,
                                          "--resume_from_checkpoint"))

    def rates(results):
        return {log["step"]: log["learning_rate"] for log in results["history"] if "learning_rate" in log}

    assert rates(longer)[3] > 0 and rates(resumed)[3] == pytest.approx(rates(longer)[3])
    assert rates(resumed)[4] == pytest.approx(rates(longer)[4])
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("four", "two"))
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)  # the steps the rates drive, too
    with pytest.raises(ValueError, match="is at step 4, past --max_steps 3: resume with --max_steps 4 or more"):
        train_gsm8k.main(gsm8k_argv(llama_dir, tmp_path / "two", "--max_steps", "3", *schedule,
                                    "--resume_from_checkpoint"))


def test_a_glue_run_killed_during_export_resumes_without_an_extra_step(model_dir, tmp_path, monkeypatch):  # noqa: F811
    full, killed = tmp_path / "full", tmp_path / "killed"
    train_glue.main(glue_argv(model_dir, full, "--max_steps", "2"))
    with monkeypatch.context() as patch:
        patch.setattr(glue_run, "save_run", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            train_glue.main(glue_argv(model_dir, killed, "--max_steps", "2"))
    results = train_glue.main(glue_argv(model_dir, killed, "--max_steps", "2", "--resume_from_checkpoint"))
    assert results["complete"] and results["last"]["step"] == 2
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_resuming_with_another_number_of_processes_is_refused(llama_dir, tmp_path, capsys):  # noqa: F811
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    LlmmConfig(r=64, lora_alpha=16, k=2, target_modules=LLAMA_TARGETS).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 4}))
    for rank in (0, 1):
        torch.save({}, checkpoint / f"rng_state_{rank}.pth")
    assert checkpoints.checkpoint_world_size(checkpoint) == 2
    code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, tmp_path / "run", "--max_steps", "4",
                                                  "--resume_from_checkpoint"), capsys)
    assert code == 2 and "was written by 2 process(es), this run has 1: resume with 2" in line


@pytest.mark.parametrize("fault, message", [
    ("nan", "holds non-finite \\(NaN or inf\\) weights or optimizer state: resume from an earlier checkpoint"),
    ("truncated", "adapter_model.safetensors' is truncated or corrupt"),
])
def test_a_broken_checkpoint_is_refused(tmp_path, fault, message):
    checkpoint = tmp_path / "checkpoint-1"
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=2, target_modules=["q_proj"]))
    model.save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1, "max_steps": 4}))
    torch.save({}, checkpoint / "rng_state.pth")
    torch.save(noise_source(model).state_dict(), checkpoint / checkpoints.NOISE_STATE.format(0))
    checkpoints.check_checkpoint(str(checkpoint), {"K": 2, "rank": 4})  # intact: accepted
    weights = checkpoint / "adapter_model.safetensors"
    if fault == "nan":
        save_file({key: torch.full_like(t, float("nan")) for key, t in load_file(weights).items()}, weights)
    else:
        weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match=message):
        checkpoints.check_checkpoint(str(checkpoint), {"K": 2, "rank": 4})


# --- run_main: environment faults become one line -----------------------------------------------------------------

@pytest.mark.parametrize("error, expected", [
    (PermissionError(13, "Permission denied", "/data/run/settings.json"),
     r"'/data/run/settings.json': permission denied: check its permissions or choose another path"),
    (OSError(30, "Read-only file system", "/ro/run"), r"'/ro/run': read-only file system: choose a writable"),
    (OSError(28, "No space left on device", "/full/run/checkpoints/checkpoint-5/optimizer.pt"),
     r"optimizer.pt': no space left on device: free space or write elsewhere.*--resume_from_checkpoint"),
])
def test_run_main_turns_environment_faults_into_one_line(capsys, error, expected):
    def main():
        raise error

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and re.search(expected, lines[0]), lines


def test_a_full_disk_inside_torch_save_is_one_line_and_other_runtime_errors_are_not_hidden(capsys):
    def main():
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "no space left on device: free space" in lines[0]
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--debug"])
    with pytest.raises(OSError, match="No space"):
        run_main(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "f")))
    assert sys.argv == ["x"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_output_parent_is_one_line(tmp_path, capsys, llama_dir):  # noqa: F811
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, line = cli(train_gsm8k.main, gsm8k_argv(llama_dir, locked / "run", "--max_steps", "1"), capsys)
    assert code == 2 and "is not writable" in line


# --- drivers resolve relative paths where the user stands ---------------------------------------------------------

def test_drivers_resolve_relative_paths_where_the_user_stands(llama_dir, tmp_path):  # noqa: F811
    """_init.sh writes ./q/ from ./tiny, and test_gsm8k.sh reads RUNS=run, in the user's directory (both at once)."""
    import shutil

    shutil.copytree(llama_dir, tmp_path / "tiny")
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{broken")
    init = subprocess.Popen(["bash", str(REPO_ROOT / "_init.sh"), "--model", "./tiny", "--save_dir", "q", "--rank",
                             "8", "--bits", "4", "--loftq_iter", "1", "--dtype", "float32"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    test = subprocess.Popen(["bash", str(REPO_ROOT / "test_gsm8k.sh")], cwd=tmp_path, env={**ENV, "RUNS": "run"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    init_err, test_err = init.communicate(timeout=300)[1], test.communicate(timeout=300)[1]
    assert init.returncode == 0, init_err[-2000:]
    assert (tmp_path / "q" / "tiny-4bit-8rank" / "llmm_init" / "adapter_config.json").is_file()
    assert test.returncode == 2
    assert test_err.strip().splitlines()[-1].startswith("error: 'run/adapter/adapter_config.json' is not valid JSON")
