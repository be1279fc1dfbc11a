"""Reliability: what a run computes and records: per-question probabilities, one precision and one 4-bit kernel for
every evaluation, training streams untouched by evaluation, resume refusing other settings, a backbone path that
still names the right backbone from another directory."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_llama_scripts import DATA as LM_DATA
from test_llama_scripts import FAST, FP32, save_tiny_llama
from test_mcq import DATA, tiny_dir, tokenizer, train_argv  # noqa: F401  (fixtures)
from test_safety import cli

from llmm.run.schema import CausalLMRun
from llmm import outdirs
from llmm.tasks import calibration as C
from scripts import test_mcq, train_mcq


def train(argv):
    results = train_mcq.main(argv)
    outdirs.release_all()
    return results


@pytest.fixture(scope="module")
def llmm_run(tiny_dir, tmp_path_factory):  # noqa: F811
    """An Llmm run (K = 2) of three steps with a checkpoint at each, evaluated in mean and mc mode."""
    run = tmp_path_factory.mktemp("flows") / "llmm"
    train(train_argv(tiny_dir, run, "--max_steps", "3", "--save_steps", "1", "--eval_steps", "1",
                     "--eval_modes", "mean", "mc"))
    return run


def losses(results):
    return [(h["step"], h["loss"]) for h in results["history"] if "loss" in h]


# --- evaluation never touches the training streams --------------------------------------------------------------------

def mcq_losses(tiny_dir, out, noise):  # noqa: F811
    return losses(train(train_argv(tiny_dir, out, "--max_steps", "3", "--eval_steps", "1", "--eval_noise", noise)))


def test_mcq_training_losses_do_not_depend_on_the_evaluation_noise(tiny_dir, tmp_path):  # noqa: F811
    mean, sample = mcq_losses(tiny_dir, tmp_path / "mean", "mean"), mcq_losses(tiny_dir, tmp_path / "sample", "sample")
    assert len(mean) == 3 and mean == sample


def test_glue_training_losses_do_not_depend_on_the_evaluation_noise(tmp_path):
    from test_glue import DATA as GLUE_DATA
    from test_glue import SMOKE, save_tiny_model

    from scripts import train_glue

    model = save_tiny_model(tmp_path / "deberta")
    curves = {}
    for noise in ("mean", "mc"):
        passes = ["--mc_samples", "2"] if noise == "mc" else []
        results = train_glue.main(["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--eval_noise",
                                   noise, *passes, *SMOKE[2:], "--max_steps", "6",
                                   "--model", model, "--data_dir", str(GLUE_DATA),
                                   "--output_dir", str(tmp_path / noise)])
        outdirs.release_all()
        curves[noise] = [e["train_loss"] for e in results["epochs"]]
    assert len(curves["mean"]) >= 2 and curves["mean"] == curves["mc"]


def test_causal_lm_training_losses_do_not_depend_on_the_evaluation_noise(tmp_path):
    """train_gsm8k's held-out evaluation every step, of the mean network or sampled: the same training losses."""
    from scripts import train_gsm8k

    save_tiny_llama(tmp_path / "base")
    curves = {}
    for noise in ("mean", "sample"):
        results = train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path",
                                    str(tmp_path / "base"), "--init", "lora", "--data", str(LM_DATA / "gsm8k.jsonl"),
                                    "--eval_split", "heldout", "--eval_size", "2", "--eval_noise", noise,
                                    "--eval_steps", "1", "--output_dir", str(tmp_path / noise), *FP32,
                                    "--max_steps", "3", "--logging_steps", "1"])
        outdirs.release_all()
        curves[noise] = losses(results)
        held_out = [h["eval_loss"] for h in results["history"] if "eval_loss" in h]
    assert len(curves["mean"]) == 3 and curves["mean"] == curves["sample"]
    assert len(held_out) >= 3  # it did evaluate between the steps


# --- a run saves what its figures are computed from ---------------------------------------------------------------

def test_a_multiple_choice_run_saves_every_questions_probabilities(llmm_run):
    results = json.loads((llmm_run / "results.json").read_text())
    for entry in results["evaluations"]:
        recomputed = C.evaluate_questions(entry["questions"])
        assert len(entry["questions"]) == entry["n"]
        for name in ("accuracy", "ece", "nll", "brier"):
            assert recomputed[name] == pytest.approx(entry[name], abs=1e-9)


def test_one_bf16_adapter_gives_the_same_figures_in_train_mcq_and_test_mcq(tiny_dir, tmp_path):  # noqa: F811
    trained = train(train_argv(tiny_dir, tmp_path / "run", "--dtype", "bfloat16", "--max_steps", "2",
                               "--eval_modes", "mean", "mc"))
    tested = test_mcq.main(["--runs", str(tmp_path / "run"), "--output_dir", str(tmp_path / "again")])
    outdirs.release_all()
    assert "eval_precision" in trained and trained["eval_precision"] == tested["eval_precision"]
    assert [(e["mode"], e["nll"], e["accuracy"]) for e in tested["evaluations"]] == [
        (e["mode"], e["nll"], e["accuracy"]) for e in trained["evaluations"]]


def test_an_nf4_bf16_run_gives_the_same_figures_in_train_mcq_and_test_mcq(tiny_dir, tmp_path):  # noqa: F811
    """train_mcq.sh's bnb-nf4 backbone (bitsandbytes NF4, bf16 compute): trained, saved, reloaded, the same answers."""
    trained = train(train_argv(tiny_dir, tmp_path / "run", "--load_in_4bit", "true", "--init", "lora", "--dtype",
                               "bfloat16", "--max_steps", "2", "--eval_modes", "mean", "mc"))
    tested = test_mcq.main(["--runs", str(tmp_path / "run"), "--output_dir", str(tmp_path / "again")])
    outdirs.release_all()
    assert trained["backbone"] == "nf4" and trained["evaluations"][0]["cell"]["load_in_4bit"] is True
    assert [(e["mode"], e["nll"], e["accuracy"]) for e in tested["evaluations"]] == [
        (e["mode"], e["nll"], e["accuracy"]) for e in trained["evaluations"]]

# --- one 4-bit kernel for every batch ------------------------------------------------------------------------------

def nf4_letter_head(tokenizer, folder):  # noqa: F811
    from llmm.run import causal_lm
    from test_mcq import llmm_model, tiny_causal_lm

    from llmm import load_llmm_model, save_llmm_adapter

    if not (folder / "adapter").is_dir():
        tiny_causal_lm(tokenizer).save_pretrained(folder / "backbone")  # the backbone llmm_model adapts
        tokenizer.save_pretrained(folder / "backbone")
        save_llmm_adapter(llmm_model(tokenizer), str(folder / "adapter"))
    model, _ = causal_lm.load_backbone(CausalLMRun.of({"model_name_or_path": str(folder / "backbone"),
                                                       "dtype": "float32", "load_in_4bit": True}))
    model = load_llmm_model(model, str(folder / "adapter")).eval()
    from llmm.tasks.mcq import letter_token_ids

    return C.LetterHead(model, letter_token_ids(tokenizer, 5)), model


def test_nf4_on_cpu_every_batch_of_an_evaluation_uses_the_same_kernel(tokenizer, tmp_path):  # noqa: F811
    """bitsandbytes repacks a CPU Linear4bit at its first no-grad eval forward; the repacked kernel must serve the
    first batch too, so a batch's probabilities do not depend on where it comes in the evaluation."""
    from test_mcq import question_batches

    batches, _ = question_batches(tokenizer, batch_size=4)
    first, _ = nf4_letter_head(tokenizer, tmp_path)
    forward, _ = C.predict(first, batches, "mean")
    second, _ = nf4_letter_head(tokenizer, tmp_path)
    backward, _ = C.predict(second, batches[::-1], "mean")
    sizes = np.cumsum([0] + [len(b["labels"]) for b in batches[::-1]])
    reordered = np.concatenate([backward[sizes[i]:sizes[i + 1]] for i in reversed(range(len(batches)))])
    np.testing.assert_array_equal(forward, reordered)


def test_nf4_after_keep_cpu_4bit_trainable_evaluates_as_plain_peft(tokenizer, tmp_path):  # noqa: F811
    from test_mcq import question_batches

    from llmm.model import keep_cpu_4bit_trainable

    batches, _ = question_batches(tokenizer, batch_size=4)
    plain, _ = nf4_letter_head(tokenizer, tmp_path)
    training_side, model = nf4_letter_head(tokenizer, tmp_path)
    keep_cpu_4bit_trainable(model)
    np.testing.assert_array_equal(C.predict(plain, batches, "mean")[0], C.predict(training_side, batches, "mean")[0])


def test_cpu_4bit_as_plain_peft_evaluates_as_a_reloaded_model_and_restores_training_exactly(tokenizer, tmp_path):  # noqa: F811,E501
    import bitsandbytes as bnb
    from test_mcq import question_batches

    from llmm.model import keep_cpu_4bit_trainable

    batches, _ = question_batches(tokenizer, batch_size=4)
    plain, _ = nf4_letter_head(tokenizer, tmp_path)
    expected = C.predict(plain, batches, "mean")[0]
    head, model = nf4_letter_head(tokenizer, tmp_path)
    keep_cpu_4bit_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in layers]
    training_side = C.predict(head, batches, "mean")[0]
    with C.cpu_4bit_as_plain_peft(model):
        np.testing.assert_array_equal(C.predict(head, batches, "mean")[0], expected)  # every batch, the first too
    for m, (data, absmax) in zip(layers, before):
        assert not m.support_avx512bf16_for_cpu and not getattr(m.weight.quant_state, "packing_format_for_cpu", 0)
        assert torch.equal(m.weight.data, data) and torch.equal(m.weight.quant_state.absmax, absmax)
    np.testing.assert_array_equal(C.predict(head, batches, "mean")[0], training_side)  # training's kernel again


# --- resume refuses what would change the run --------------------------------------------------------------------

def resume_argv(tiny_dir, run, *extra):  # noqa: F811
    return train_argv(tiny_dir, run, "--max_steps", "3", "--save_steps", "1", "--eval_steps", "1", "--eval_modes",
                      "mean", "mc", "--resume_from_checkpoint", "latest", *extra)


@pytest.mark.parametrize("extra", [["--seed", "2"], ["--train_data", "obqa"], ["--lora_dropout", "0.1"],
                                   ["--max_length", "200"]], ids=["seed", "train_data", "lora_dropout", "max_length"])
def test_resume_with_other_settings_is_refused_and_changes_nothing(llmm_run, tiny_dir, tmp_path, capsys,  # noqa: F811
                                                                   extra):
    from test_safety import tree

    run = tmp_path / "run"
    shutil.copytree(llmm_run, run)
    if extra[0] == "--train_data":
        extra = ["--train_data", str(DATA / "obqa.jsonl")]
    before = tree(run)
    code, line = cli(train_mcq.main, resume_argv(tiny_dir, run, *extra), capsys)
    assert code == 2 and extra[0].lstrip("-") in line and tree(run) == before


def test_a_refused_resume_leaves_settings_json_as_it_was(llmm_run, tiny_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(llmm_run, run)
    before = (run / "settings.json").read_bytes()
    code, _ = cli(train_mcq.main, resume_argv(tiny_dir, run, "--target_modules", "q_proj"), capsys)
    assert code == 2 and (run / "settings.json").read_bytes() == before


def test_a_run_inside_the_checkpoint_it_resumes_from_is_refused(llmm_run, tiny_dir, tmp_path, capsys):  # noqa: F811
    from test_safety import tree

    checkpoint = llmm_run / "checkpoints" / "checkpoint-3"
    before = tree(llmm_run)
    argv = resume_argv(tiny_dir, checkpoint / "new")
    argv[argv.index("latest")] = str(checkpoint)
    code, line = cli(train_mcq.main, argv, capsys)
    assert code == 2 and "lies inside --resume_from_checkpoint" in line and tree(llmm_run) == before


# --- a relative backbone path still names the right backbone -----------------------------------------------------------

def test_in_process_loftq_with_a_relative_output_dir_records_a_path_valid_anywhere(tmp_path, monkeypatch):
    from scripts import train_gsm8k

    from llmm import LlmmConfig

    save_tiny_llama(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(tmp_path / "base"),
                      "--init", "loftq", "--loftq_iter", "1", "--data", str(LM_DATA / "gsm8k.jsonl"),
                      "--eval_split", "heldout", "--eval_size", "2", "--output_dir", "runs/x", *FP32, *FAST])
    outdirs.release_all()
    recorded = LlmmConfig.from_pretrained(str(tmp_path / "runs/x/adapter")).base_model_name_or_path
    assert recorded == str(tmp_path / "runs" / "x" / "backbone")


# --- Monte-Carlo networks of different seeds never overlap ------------------------------------------------------------

def test_gsm8k_mc_networks_of_two_seeds_share_none(tmp_path, monkeypatch):
    from scripts import test_gsm8k

    from transformers import AutoModelForCausalLM

    from llmm import LlmmConfig, get_llmm_model, save_llmm_adapter

    save_tiny_llama(tmp_path / "base")
    model = get_llmm_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LlmmConfig(r=4, lora_alpha=8, k=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    from llmm.run import gsm8k_test

    drawn, original = [], gsm8k_test.sampled_network

    def recording(model, seed):
        drawn[-1].append(seed)
        return original(model, seed)

    monkeypatch.setattr(gsm8k_test, "sampled_network", recording)  # where predict looks it up
    for seed in ("1", "2"):
        drawn.append([])
        test_gsm8k.main(["--adapter", str(tmp_path / "adapter"), "--output_dir", str(tmp_path / f"s{seed}"),
                         "--mode", "mc", "--mc_samples", "3", "--max_samples", "1", "--max_new_tokens", "1",
                         "--data", str(LM_DATA / "gsm8k.jsonl"), "--seed", seed, *FP32])
        outdirs.release_all()
    assert len(drawn[0]) == len(drawn[1]) == 3 and not set(drawn[0]) & set(drawn[1])
