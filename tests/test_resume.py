"""Resume and divergence, for scripts/train_glue.py and scripts/train_gsm8k.py (llmm.run.causal_lm) on CPU.

A run killed at step N and resumed from its newest checkpoint must reproduce the uninterrupted run exactly: the
checkpoint holds the adapter's M and Z, the optimizer, the scheduler, torch's RNG states and the Llmm noise
generator's state (llmm_noise_rng_<process>.pt). A non-finite loss stops training with one line (exit code 3) and
keeps the last good checkpoint.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_glue import DATA as GLUE_DATA
from test_glue import model_dir  # noqa: F401  (the tiny DeBERTa fixture)
from test_llama_scripts import save_tiny_llama

from llmm.run import checkpoints, cli, schema
from llmm.run import trainer as training
from conftest import REPO_ROOT
from scripts import train_glue, train_gsm8k

GSM8K_DATA = REPO_ROOT / "tests" / "data" / "gsm8k.jsonl"


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


def kill_at_step(monkeypatch, step: int) -> None:
    """Make the next training run die as optimizer step ``step`` begins (after the checkpoints before it)."""
    original = training.LlmmTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            raise Killed(step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training.LlmmTrainer, "training_step", training_step)


def run_until_killed(monkeypatch, main, argv, step):
    with monkeypatch.context() as patch:
        kill_at_step(patch, step)
        with pytest.raises(Killed):
            main(argv)


def same_tensors(dir_a, dir_b):
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (dir_a, dir_b))
    assert a.keys() == b.keys() and any("lora_llmm_" in key for key in a)
    return all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def glue_argv(model_dir, out, *extra):
    return ["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--K", "2", "--model", model_dir,
            "--data_dir", str(GLUE_DATA), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--per_device_eval_batch_size", "8",
            "--eval_steps", "1", "--save_steps", "1", "--learning_rate", "1e-3", "--llmmscale", "4",
            "--output_dir", str(out), *extra]


def gsm8k_argv(llama_dir, out, *extra):
    """llmm with standard LoRA init over an NF4 backbone; 2 micro-batches per step, 2 steps per epoch."""
    return ["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(llama_dir), "--init", "lora",
            "--data", str(GSM8K_DATA), "--eval_split", "heldout", "--eval_size", "2", "--load_in_4bit", "true",
            "--dtype", "float32", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "1", "--learning_rate", "1e-3",
            "--llmmscale", "4", "--lora_dropout", "0.0", "--output_dir", str(out), *extra]


# --- resume --------------------------------------------------------------------------------------------------------

def test_glue_resume_mid_epoch_reproduces_the_uninterrupted_run(model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                 caplog):
    """8 training rows, batch 4: 2 steps per epoch. Killed at step 4, resumed from checkpoint-3 (mid-epoch).
    Embeddings quantized with Gaussian pairs: their M, Z and noise are restored too."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_glue.main(glue_argv(model_dir, full, "--max_steps", "5", "--gaussian_embeddings", "true"))
    run_until_killed(monkeypatch, train_glue.main, glue_argv(model_dir, resumed, "--max_steps", "5",
                                                             "--gaussian_embeddings", "true"), step=4)
    assert [p.name for p in sorted(resumed.glob("checkpoint-*"))] == ["checkpoint-3"]  # save_total_limit 1
    assert (resumed / "checkpoint-3" / "llmm_noise_rng_0.pt").is_file()  # the noise generator's state
    assert not json.loads((resumed / "results.json").read_text())["complete"]
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint"):  # no silent restart into a used dir
        train_glue.main(glue_argv(model_dir, resumed, "--max_steps", "5"))
    for other, message in ((["--gaussian_embeddings", "false"], "gaussian_embeddings=True"),
                           (["--no-quantize_embeddings"], "quantize_embeddings=True"),
                           (["--gaussian_embeddings", "true", "--llmmscale", "5"], "llmmscale=4.0")):
        with pytest.raises(ValueError, match=message):  # another model than the checkpoint's: refused up front
            train_glue.main(glue_argv(model_dir, resumed, "--max_steps", "5", *other, "--resume_from_checkpoint"))
    assert json.loads((resumed / "settings.json").read_text())["resumed_from"] is None  # not rewritten
    (resumed / "eval").mkdir()
    (resumed / "eval" / "mean.json").write_text("{}")  # eval_glue's scores of an earlier adapter: stale after this
    (resumed / "eval" / "notes.txt").write_text("mine")  # the user's: kept
    with caplog.at_level("INFO", logger="llmm"):
        train_glue.main(glue_argv(model_dir, resumed, "--max_steps", "5", "--gaussian_embeddings", "true",
                                  "--resume_from_checkpoint"))
    said = [record.getMessage() for record in caplog.records]
    loaded = next(i for i, line in enumerate(said) if line.startswith("training on "))  # after the model's load
    assert said[loaded + 1].startswith(f"resuming from {resumed / 'checkpoint-3'}: its trained weights")

    results = [json.loads((run / "results.json").read_text()) for run in (full, resumed)]
    assert all(r["complete"] for r in results)
    losses = [[(e["step"], e["train_loss"]) for e in r["epochs"]] for r in results]
    assert [step for step, _ in losses[0]] == [1, 2, 3, 4, 5]
    assert losses[0] == losses[1]  # bit-identical per-step training losses, steps 1-3 restored from the checkpoint
    assert [e["dev"] for e in results[0]["epochs"]] == [e["dev"] for e in results[1]["epochs"]]
    assert same_tensors(full, resumed)  # M and Z (and the classifier head) end up identical
    assert any("lora_embedding_A" in key for key in load_file(full / "adapter" / "adapter_model.safetensors"))
    assert json.loads((resumed / "settings.json").read_text())["resumed_from"] == str(resumed / "checkpoint-3")
    assert [path.name for path in (resumed / "eval").iterdir()] == ["notes.txt"]
    newest = checkpoints.complete_checkpoints(resumed)[-1]
    (newest / "llmm_noise_rng_0.pt").unlink()  # without the noise state the run cannot continue exactly
    with pytest.raises(FileNotFoundError, match="has no llmm_noise_rng_0.pt"):
        checkpoints.check_checkpoint(str(newest), {"K": 2, "rank": 16})


def test_gsm8k_resume_at_an_epoch_boundary_with_accumulation(llama_dir, tmp_path, monkeypatch, caplog):
    """4 training records, batch 1 x 2 accumulated: 2 steps per epoch. Killed at step 3, resumed from checkpoint-2."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_gsm8k.main(gsm8k_argv(llama_dir, full, "--max_steps", "4"))
    run_until_killed(monkeypatch, train_gsm8k.main, gsm8k_argv(llama_dir, resumed, "--max_steps", "4"), step=3)
    checkpoint = resumed / "checkpoints" / "checkpoint-2"
    assert checkpoint.is_dir() and not (resumed / "adapter").exists()
    stale = resumed / "test-greedy-mean"  # test_gsm8k.sh's scores of an earlier adapter: stale after the resume
    stale.mkdir()
    (stale / "predictions.jsonl").write_text("")
    (stale / "results.json").write_text('{"accuracy": 0.5}')
    (stale / "my_analysis.md").write_text("mine")  # the user's, beside them: kept
    (resumed / "notes").mkdir()  # not a test's: kept
    with caplog.at_level("INFO", logger="llmm"):
        train_gsm8k.main(gsm8k_argv(llama_dir, resumed, "--max_steps", "4", "--resume_from_checkpoint",
                                    str(checkpoint)))
    assert f"resuming from {checkpoint}" in caplog.text and "the mean of steps 1-4 (the Trainer's" in caplog.text
    assert f"training on 4 examples, evaluating on 2; every setting in {resumed / 'settings.json'}" in caplog.text

    results = [json.loads((run / "results.json").read_text()) for run in (full, resumed)]
    losses = [[(h["step"], h["loss"]) for h in r["history"] if "loss" in h] for r in results]
    assert [step for step, _ in losses[0]] == [1, 2, 3, 4]
    assert losses[0] == losses[1]
    assert results[0]["eval_loss"] == results[1]["eval_loss"] and results[1]["resumed_from"] == str(checkpoint)
    assert [path.name for path in stale.iterdir()] == ["my_analysis.md"] and (resumed / "notes").is_dir()
    assert same_tensors(full, resumed)
    assert results[1]["train_loss"] == pytest.approx(results[0]["train_loss"], rel=1e-6)  # the whole run's mean


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    states = {2: '{"global_step": 2}', 3: '{"global_step": 3}', 10: None, 11: "", 12: '{"global_step": 1',
              13: "{}", 20: '{"global_step": 20}'}  # None: cut short by a crash; 11, 12: a full disk
    for step, state in states.items():
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-20" / "trainer_state.json").unlink()  # cut short by a crash
    for step in (11, 12, 13):
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            checkpoints.find_checkpoint(str(tmp_path / f"checkpoint-{step}"), tmp_path)
    (tmp_path / "checkpoint-best").mkdir()
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert checkpoints.find_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-3")  # by step number, complete
    assert checkpoints.find_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoints.find_checkpoint(str(tmp_path / "checkpoint-10"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N in"):
        checkpoints.find_checkpoint("latest", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="checkpoint-7' does not exist: pass a checkpoint-N directory"):
        checkpoints.find_checkpoint(str(tmp_path / "checkpoint-7"), tmp_path)


# --- divergence ----------------------------------------------------------------------------------------------------

def diverge(main, argv, capsys) -> str:
    """Run an entry point as the command line does; returns its one error line (exit code 3)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: main(argv))
    assert exit_info.value.code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and [line for line in lines if line.startswith("error:")] == [lines[-1]]
    return lines[-1]


def test_glue_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, capsys):  # noqa: F811
    """A learning rate of 1e30 makes step 2's forward overflow: the run stops there, before the optimizer step."""
    out = tmp_path / "run"
    line = diverge(train_glue.main, glue_argv(model_dir, out, "--max_steps", "4", "--learning_rate", "1e30"), capsys)
    assert line.startswith("error: training loss is nan at step 2; stopped, the last good checkpoint is ")
    assert str(out / "checkpoint-1") in line and "--learning_rate" in line and "a resume keeps this run" in line
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert all(t.isfinite().all() for t in load_file(out / "checkpoint-1" / "adapter_model.safetensors").values())
    assert not (out / "adapter").exists() and not json.loads((out / "results.json").read_text())["complete"]


def test_gsm8k_nan_loss_stops_with_one_line(llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = diverge(train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "4", "--learning_rate", "1e30",
                                                "--max_grad_norm", "0"), capsys)
    step = int(re.search(r"^error: training loss is (?:nan|inf|-inf) at step (\d+); stopped", line).group(1))
    assert step >= 2 and f"the last good checkpoint is '{out}/checkpoints/checkpoint-{step - 1}'" in line
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == [f"checkpoint-{step - 1}"]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()


@pytest.mark.parametrize("content, problem", [("{broken", "is not valid JSON"), ("[1]", "holds a list"),
                                              ('{"rank": 0}', "has rank = 0, which must be an integer >= 1")])
def test_a_run_whose_settings_json_cannot_be_read_is_not_resumed(tmp_path, content, problem):
    (tmp_path / "settings.json").write_text(content)
    with pytest.raises(ValueError, match=f"{problem}.*cannot be resumed safely; start a new run in another"):
        checkpoints.check_resumable(tmp_path, {"rank": 16}, schema.FAMILY_BLOCKS["glue"])


def test_a_resume_keeps_the_settings_of_the_run_the_checkpoint_comes_from(tmp_path):
    """The checkpoint's own run decides (also when resuming into a new --output_dir), and a setting it left unset
    (null, e.g. --max_train_samples) may not be added."""
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"seed": 17, "learning_rate": 3e-4}))
    found = checkpoints.checkpoint_run(run / "checkpoints" / "checkpoint-1", tmp_path / "new")
    assert found == run.resolve()
    assert checkpoints.checkpoint_run(tmp_path / "elsewhere" / "checkpoint-1", tmp_path / "new") == tmp_path / "new"
    blocks = schema.FAMILY_BLOCKS["causal_lm"]
    checkpoints.check_resumable(found, {"seed": 17, "learning_rate": 3e-4, "max_steps": 9}, blocks)  # longer: fine
    with pytest.raises(ValueError, match=r"trained with seed=17, this command says 5"):
        checkpoints.check_resumable(found, {"seed": 5, "learning_rate": 3e-4}, blocks)
    with pytest.raises(ValueError, match=r"was trained without max_train_samples, this command says 1: drop"):
        checkpoints.check_resumable(found, {"seed": 17, "learning_rate": 3e-4, "max_train_samples": 1}, blocks)
    with pytest.raises(ValueError, match=r"trained with lora_dropout=0.0, this command says 0.1"):  # its default
        checkpoints.check_resumable(found, {"seed": 17, "learning_rate": 3e-4, "lora_dropout": 0.1}, blocks)
    (run / "settings.json").write_text(json.dumps({"seed": 17, "model": "llama-2-7b", "base_model": "hub/llama"}))
    with pytest.raises(ValueError, match=r"e.g. --model llama-2-7b without --model_name_or_path\)"):  # the row's
        checkpoints.check_resumable(found, {"seed": 17, "model_name_or_path": "mine"}, blocks)  # --base_model is refused


@pytest.mark.parametrize("family", ["glue", "gsm8k"])
def test_a_complete_run_is_skipped_only_with_the_same_settings(family, model_dir, llama_dir, tmp_path, capsys):  # noqa: F811
    """--skip_if_complete (the drivers' rerun): the same command prints 'done already' and writes nothing; another
    learning rate, or a setting the run left at its default, is one error naming it, and the run stays as it was."""
    out = tmp_path / "run"
    targets = ["--target_modules", "query_proj", "key_proj", "value_proj", "dense"]  # GLUE adds the embedding tables
    main, argv = {"glue": (train_glue.main, lambda *extra: glue_argv(model_dir, out, "--max_steps", "1", *targets,
                                                                     *extra)),
                  "gsm8k": (train_gsm8k.main, lambda *extra: gsm8k_argv(llama_dir, out, "--max_steps", "1",
                                                                        "--max_train_samples", "3", *extra))}[family]
    assert main(argv("--skip_if_complete")) is not None  # nothing there yet: trained
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    capsys.readouterr()
    assert main(argv("--skip_if_complete", "--overwrite")) is None
    assert capsys.readouterr().out.strip() == f"done already: {out}"
    for extra, says in ((("--learning_rate", "3e-2"), "made with learning_rate=0.001, this command says 0.03"),
                        (("--lora_dropout", "0.1"), "made with lora_dropout=0.0, this command says 0.1")):
        with pytest.raises(ValueError, match=f"is a complete run {says}: run these settings in another"):
            main(argv("--skip_if_complete", "--overwrite", *extra))
    left_out = ("--max_steps", "max_steps=1") if family == "glue" else ("--max_train_samples", "max_train_samples=3")
    command = argv("--skip_if_complete", "--overwrite")
    at = command.index(left_out[0])
    with pytest.raises(ValueError, match=f"made with {left_out[1]}, this command says"):  # a flag the run was given
        main(command[:at] + command[at + 2:])
    with pytest.raises(ValueError, match="continue it to max_steps=2 with --resume_from_checkpoint"):
        main(argv("--skip_if_complete", "--max_steps", "2"))
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files
    if family == "glue":  # only a larger max_steps trains on: other evaluation steps are refused, not relabelled
        with pytest.raises(ValueError, match="made with eval_steps=1, this command says 2: run these settings in "
                                             "another --output_dir .*, or remove"):
            main(argv("--skip_if_complete", "--eval_steps", "2", "--resume_from_checkpoint"))
    further = main(argv("--skip_if_complete", "--max_steps", "2", "--resume_from_checkpoint"))  # trains on
    assert further.get("global_step", further.get("epochs", [{}])[-1].get("step")) == 2


def test_a_finished_run_trained_further_is_not_complete_until_it_finishes(llama_dir, tmp_path, monkeypatch):
    """A complete 1-step run resumed to 3 steps and killed: its results.json (of the 1-step run) is gone, so the
    drivers' rerun resumes it instead of skipping it as done."""
    out = tmp_path / "run"
    train_gsm8k.main(gsm8k_argv(llama_dir, out, "--max_steps", "1"))
    assert checkpoints.is_complete(out)
    run_until_killed(monkeypatch, train_gsm8k.main, gsm8k_argv(llama_dir, out, "--max_steps", "3",
                                                                "--resume_from_checkpoint"), step=3)
    assert not checkpoints.is_complete(out) and (out / "checkpoints" / "checkpoint-2").is_dir()
    results = train_gsm8k.main(gsm8k_argv(llama_dir, out, "--max_steps", "3", "--skip_if_complete",
                                          "--resume_from_checkpoint"))
    assert results["global_step"] == 3 and checkpoints.is_complete(out)


def test_list_settings_of_paths_compare_by_the_files_they_name(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dev.tsv").write_text("x")
    monkeypatch.chdir(tmp_path)
    blocks = schema.FAMILY_BLOCKS["glue"]
    saved = {"validation_file": ["data/dev.tsv"]}
    assert checkpoints.first_difference(saved, {"validation_file": ["./data/dev.tsv"]}, ["validation_file"], blocks) is None
    assert checkpoints.first_difference(saved, {"validation_file": [str(tmp_path / "data" / "dev.tsv")]},
                                     ["validation_file"], blocks) is None
    assert checkpoints.first_difference(saved, {"validation_file": ["data/dev.tsv", "data/dev.tsv"]},
                                     ["validation_file"], blocks)[:2] == ("validation_file", ["data/dev.tsv"])


def test_glue_gradient_accumulation_averages_the_loss(model_dir, tmp_path):  # noqa: F811
    """One step of batch 4 and one of 2 x 2 micro-batches: the same training loss (the classifier's loss is a batch
    mean, so the Trainer divides it by the accumulation steps), with K = 0 so no noise draw differs; the encoder's
    dropout masks follow the micro-batch shape."""
    losses = []
    for batch, steps in ((4, 1), (2, 2)):
        argv = glue_argv(model_dir, tmp_path / f"b{batch}", "--max_steps", "1", "--method", "loftq")
        argv[argv.index("--per_device_train_batch_size") + 1] = str(batch)
        argv[argv.index("--gradient_accumulation_steps") + 1] = str(steps)
        argv = [a for i, a in enumerate(argv) if a != "--K" and argv[i - 1] != "--K"
                and a != "--llmmscale" and argv[i - 1] != "--llmmscale"]
        results = train_glue.main(argv)
        losses.append(results["epochs"][0]["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=0.01)  # dropout masks differ by micro-batch; not 2x (as it was)


def test_a_checkpoint_without_the_run_s_loss_sum_carries_no_wrong_one(llama_dir, tmp_path, caplog):
    """A checkpoint written before checkpoints kept the run's summed step losses: the resumed run says its train_loss
    covers its own steps, and its checkpoints keep no sum (a later resume would report a wrong whole-run mean)."""
    out = tmp_path / "run"
    train_gsm8k.main(gsm8k_argv(llama_dir, out, "--max_steps", "1"))
    (out / "checkpoints" / "checkpoint-1" / checkpoints.LOSS_SUM).unlink()
    with caplog.at_level("WARNING", logger="llmm"):
        train_gsm8k.main(gsm8k_argv(llama_dir, out, "--max_steps", "2", "--resume_from_checkpoint"))
    assert "train_loss covers steps 2-2 only" in caplog.text
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "checkpoints" / "checkpoint-2" / checkpoints.LOSS_SUM).exists()
