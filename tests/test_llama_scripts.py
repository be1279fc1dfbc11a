"""scripts.train_nlg / train_gsm8k / test_gsm8k end to end on CPU: a tiny Llama with an in-process tokenizer,
16/32-bit and bitsandbytes 4-bit backbones, the three methods, mean-adapter generation, and bad input."""

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import LLAMA_TARGETS, REPO_ROOT, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from test_prompts import byte_level_tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from llmm.run.schema import CausalLMRun, Gsm8kTestRun
from llmm import LlmmConfig, get_llmm_model, llmm_layers, load_llmm_model
from llmm.tasks.prompts import encode_prompt, gsm8k_source
from scripts import lm_table, quantize_model, test_gsm8k, train_gsm8k, train_nlg
from llmm.run import gsm8k_test
from llmm.model import keep_cpu_4bit_trainable
from llmm.run.causal_lm import attach_adapter, load_backbone, prepare_for_training, table_settings

DATA = REPO_ROOT / "tests" / "data"
FAST = ["--max_steps", "2", "--logging_steps", "1"]
FP32 = ["--load_in_4bit", "false", "--dtype", "float32"]
BF16 = ["--load_in_4bit", "false", "--dtype", "bfloat16"]
NF4 = ["--load_in_4bit", "true", "--dtype", "float32"]  # NF4 weights, float32 compute
GENERATE = ["--data", str(DATA / "gsm8k.jsonl"), "--max_new_tokens", "8"]


def save_tiny_llama(path):
    """A tiny Llama (hidden 128: the GSM8K table's rank 64 fits) with an offline byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama (hidden 128, so the tables' ranks 16 and 64 fit) and its _init.sh directories for both ranks."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_llama(root / "tiny-llama")
    dirs = {"base": root / "tiny-llama"}
    for rank in (16, 64):
        dirs[rank] = quantize_model.main([
            "--model", str(root / "tiny-llama"), "--save_dir", str(root / "quantized"), "--rank", str(rank),
            "--bits", "4", "--K", "2", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "float32"])
    return dirs


def read(path):
    return json.loads(path.read_text())


def directions(adapter_dir):
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_llmm_" in k}


def check_run(out, task, k):
    """The run directory is complete and consistent."""
    for name in ("adapter/adapter_model.safetensors", "mean_adapter/adapter_model.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    results, settings = read(out / "results.json"), read(out / "settings.json")
    assert results["task"] == task and results["K"] == k == settings["K"] and results["global_step"] == 2
    assert results["seed"] == settings["seed"] and results["cell"]["K"] == k and "seed" not in results["cell"]
    assert math.isfinite(results["eval_loss"]) and results["eval_perplexity"] == pytest.approx(
        math.exp(results["eval_loss"]))
    assert results["eval_loss_at_start"] != results["eval_loss"]  # the adapter moved
    assert settings["optim_used"] == ("paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch")
    assert LlmmConfig.from_pretrained(str(out / "adapter")).k == k
    assert not any("lora_llmm_" in key for key in load_file(out / "mean_adapter" / "adapter_model.safetensors"))
    return results, settings


# --- training ------------------------------------------------------------------------------------------------------

def test_train_nlg_alpaca_from_init_dir_16bit(models, tmp_path):
    out = tmp_path / "run"
    train_nlg.main(["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", "--model_name_or_path",
                    str(models[16]), "--data", str(DATA / "alpaca.jsonl"), "--eval_size", "2", "--output_dir",
                    str(out), *BF16, *FAST])
    results, settings = check_run(out, "alpaca", k=2)
    assert settings["dtype"] == "bfloat16"
    # The table row decides what no flag overrides: the effective learning rate, llmmscale, schedule.
    assert settings["learning_rate"] == 1e-4 and settings["llmmscale"] == 400 and settings["warmup_ratio"] == 0.5
    assert results["n_train"] == 4 and results["n_held_out"] == 2 and "held out of train" in results["held_out"]
    assert any(t.abs().max() > 0 for t in directions(out / "adapter").values())  # Z grew from zero
    history = [h for h in results["history"] if "learning_rate" in h and "loss" in h]
    assert [h["learning_rate"] for h in history] == pytest.approx([0.0, 1e-4])  # 50% linear warm-up, then peak


def test_train_nlg_hh_rlhf_4bit_loftq_baseline(models, tmp_path):
    out, dataset = tmp_path / "run", tmp_path / "hh-rlhf"  # a dataset directory with the hub's two splits
    dataset.mkdir()
    lines = (DATA / "hh_rlhf.jsonl").read_text().splitlines(keepends=True)
    (dataset / "train.jsonl").write_text("".join(lines[:3]))
    (dataset / "test.jsonl").write_text("".join(lines[3:]))
    train_nlg.main(["--task", "hh-rlhf", "--model", "llama-2-7b", "--rank", "16", "--method", "loftq",
                    "--model_name_or_path", str(models[16]), "--data", str(dataset), "--output_dir", str(out),
                    *NF4, *FAST])
    results, settings = check_run(out, "hh-rlhf", k=0)  # K = 0 from a K = 2 init directory: zero directions
    assert settings["method"] == "loftq" and results["held_out"] == f"{dataset} [test]"  # the official test split
    assert results["n_train"] == 3 and results["n_held_out"] == 2
    assert all(t.numel() == 0 for t in directions(out / "adapter").values())


def test_cpu_4bit_gradients_survive_an_evaluation(models):
    """After keep_cpu_4bit_trainable, an eval forward does not break backward through NF4 layers (bitsandbytes
    would repack the weights for inference): adapter gradients equal those over the same Q in float32."""
    settings = {"model_name_or_path": str(models[16]), "dtype": "float32"}
    inputs = torch.randint(4, 300, (2, 12))
    grads = []
    for load_in_4bit in (True, False):
        model, _ = load_backbone(CausalLMRun.of({**settings, "load_in_4bit": load_in_4bit}))
        keep_cpu_4bit_trainable(model)
        model = load_llmm_model(model, str(models[16] / "llmm_init"), is_trainable=True, lora_dropout=0.0)
        model.eval()
        with torch.no_grad():
            model(input_ids=inputs)
        model.train()
        model(input_ids=inputs, labels=inputs).loss.backward()
        grads.append(model.get_parameter("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
                     .grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


# --- GSM8K: train, then test ---------------------------------------------------------------------------------------

def plain_peft_generations(backbone, mean_adapter, load_in_4bit, max_new_tokens=8, dtype="float32"):
    """Greedy generations of the fixture questions with the exported mean adapter loaded by plain PEFT."""
    model, tokenizer = load_backbone(CausalLMRun.of({"model_name_or_path": str(backbone), "dtype": dtype,
                                                     "load_in_4bit": load_in_4bit}))
    model = PeftModel.from_pretrained(model, str(mean_adapter)).eval()
    tokenizer.padding_side = "left"
    questions = [json.loads(line)["question"] for line in (DATA / "gsm8k.jsonl").read_text().splitlines()]
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, gsm8k_source(q)) for q in questions]},
                          return_tensors="pt")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        output = model.generate(**batch.to(model.device), generation_config=config)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def check_predictions(out, n=6):
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    results = read(out / "results.json")
    assert len(predictions) == results["n"] == n
    assert {"question", "generated", "extracted", "gold", "correct"} <= set(predictions[0])
    assert [p["gold"] for p in predictions] == [72, 10, 5000, -5, 1, 2.25][:n]
    assert all(p["correct"] == (p["extracted"] == p["gold"]) for p in predictions)
    assert results["accuracy"] == sum(p["correct"] for p in predictions) / n
    return predictions, results


def test_gsm8k_in_process_loftq_16bit_then_test_all_modes(models, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(models["base"]),
                      "--init", "loftq", "--loftq_iter", "1", "--data", str(DATA / "gsm8k.jsonl"),
                      "--eval_split", "heldout", "--eval_size", "2", "--output_dir", str(run), *FP32, *FAST])
    check_run(run, "gsm8k", k=2)
    # In-process LoftQ replaced the backbone by Q: it is saved beside the adapter, which names it.
    assert LlmmConfig.from_pretrained(str(run / "adapter")).base_model_name_or_path == str(run / "backbone")
    assert (run / "backbone" / "model.safetensors").is_file()

    test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "mean"), *GENERATE, *FP32])
    predictions, results = check_predictions(tmp_path / "mean")
    assert results["model"] == str(run / "backbone") and results["mode"] == "mean"
    assert results["cell"]["test_model_name_or_path"] == "the adapter's"  # one value for every run: seeds pool
    # Mean mode (merged into the 32-bit backbone) generates what plain PEFT does with the exported mean adapter.
    assert [p["generated"] for p in predictions] == plain_peft_generations(run / "backbone", run / "mean_adapter",
                                                                           load_in_4bit=False)

    test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "mc"), "--mode", "mc",
                     "--mc_samples", "3", "--max_samples", "2", "--decoding", "reference", *GENERATE, *FP32])
    predictions, results = check_predictions(tmp_path / "mc", n=2)
    assert all(len(p["votes"]) == len(p["generated"]) == 3 for p in predictions)
    assert results["settings"]["temperature"] == 0.1 and results["settings"]["top_k"] == 40
    # test_gsm8k.sh's rerun (--skip_if_complete): the same evaluation is skipped, another one is an error
    mc = ["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "mc"), "--mode", "mc", "--max_samples",
          "2", "--decoding", "reference", "--skip_if_complete", "--overwrite", *GENERATE, *FP32]
    assert test_gsm8k.main([*mc, "--mc_samples", "3"]) is None
    assert test_gsm8k.main([*mc, "--mc_samples", "3", "--K", "2"]) is None  # --K: a check of the adapter, no setting
    rel = ["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "rel"), "--max_samples", "1",
           "--skip_if_complete", "--max_new_tokens", "8", *FP32]
    with monkeypatch.context() as patch:  # a data file typed relative to one directory, then from another: the same
        patch.chdir(DATA)
        test_gsm8k.main([*rel, "--data", "gsm8k.jsonl"])
        patch.chdir(tmp_path)
        assert test_gsm8k.main([*rel, "--data", str(DATA / "gsm8k.jsonl")]) is None
    with pytest.raises(ValueError, match="is a complete run made with mc_samples=3, this command says 5"):
        test_gsm8k.main([*mc, "--mc_samples", "5"])
    assert read(tmp_path / "mc" / "results.json") == results

    test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "sample"), "--mode",
                     "sample", "--max_samples", "2", "--K", "2", *GENERATE, *FP32])
    check_predictions(tmp_path / "sample", n=2)
    # The three evaluations of one trained run are three cells (test mode, decoding, ...), never pooled as seeds.
    text = lm_table.main([str(tmp_path / name) for name in ("mean", "mc", "sample")])
    rows = [line for line in text.splitlines() if line.startswith("| llmm llama-2-7b r64")]
    assert len(rows) == 3 and all(" | 1 | " in row for row in rows) and "test_mode=mc" in text


def test_gsm8k_4bit_from_init_dir_then_test_mean_mode(models, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.chdir(Path(models[64]).parent)  # the _init.sh directory typed relatively: recorded by its real path
    train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", Path(models[64]).name,
                      "--data", str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "2",
                      "--output_dir", str(run), *NF4, *FAST])
    monkeypatch.chdir(tmp_path)
    results, settings = check_run(run, "gsm8k", k=2)
    real = Path(models[64]).resolve()
    assert settings["model_name_or_path"] == str(real) == results["cell"]["model_name_or_path"]
    assert results["cell"]["init_source"] == str(real / "llmm_init")
    assert settings["load_in_4bit"] is True and settings["method"] == "llmm"
    assert settings["loftq_iter"] == 1  # the _init.sh directory's LoftQ settings, not the table's (5)
    with pytest.raises(ValueError, match=r"quantized with loftq_iter=1 but --loftq_iter 5 was given"):
        train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(models[64]),
                          "--data", str(DATA / "gsm8k.jsonl"), "--loftq_iter", "5", "--output_dir", str(tmp_path / "x")])
    test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "test"), *GENERATE, *NF4])
    predictions, _ = check_predictions(tmp_path / "test")
    # Over NF4 the adapter stays unmerged (merging would re-quantize); still the same as plain PEFT.
    assert [p["generated"] for p in predictions] == plain_peft_generations(models[64], run / "mean_adapter",
                                                                           load_in_4bit=True)


def test_gsm8k_qlora_baseline_4bit(models, tmp_path):
    run = tmp_path / "run"
    train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--method", "qlora", "--model_name_or_path",
                      str(models["base"]), "--data", str(DATA / "gsm8k.jsonl"), "--eval_data",
                      str(DATA / "gsm8k.jsonl"), "--output_dir", str(run), *NF4, *FAST])
    results, settings = check_run(run, "gsm8k", k=0)
    assert results["held_out"] == str(DATA / "gsm8k.jsonl") and results["n_held_out"] == 6
    assert settings["init"] == "lora" and settings["init_source"] == "lora (in-process)"
    assert not (run / "backbone").exists()  # the original checkpoint stays the backbone
    assert LlmmConfig.from_pretrained(str(run / "adapter")).base_model_name_or_path == str(models["base"])


def test_held_out_loss_is_per_target_token_whatever_the_eval_batch(models, tmp_path):
    """The held-out loss is the whole split's NLL per target token: the same for any per_device_eval_batch_size
    (here 6 records in batches of 1, or of 4 + 2) and, before training (B = 0), the backbone's own."""
    losses = []
    for batch in (1, 4):
        results = train_gsm8k.main([
            "--model_name_or_path", str(models["base"]), "--rank", "4", "--init", "lora", "--data",
            str(DATA / "gsm8k.jsonl"), "--eval_data", str(DATA / "gsm8k.jsonl"), "--output_dir",
            str(tmp_path / f"eval-batch-{batch}"), "--per_device_eval_batch_size", str(batch), "--max_steps", "1",
            *FP32])
        losses.append((results["eval_loss_at_start"], results["eval_loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)
    model, tokenizer = LlamaForCausalLM.from_pretrained(models["base"]), byte_level_tokenizer()
    nll, tokens = 0.0, 0
    for line in (DATA / "gsm8k.jsonl").read_text().splitlines():
        encoded = train_gsm8k.encode(tokenizer, argparse.Namespace(max_length=512), json.loads(line))
        labels = torch.tensor(encoded["labels"])[1:]
        with torch.no_grad():
            logits = model(torch.tensor([encoded["input_ids"]])).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    assert losses[0][0] == pytest.approx(nll / tokens, rel=1e-5)


def test_records_whose_target_max_length_cuts_off_are_left_out(models, tmp_path, caplog):
    """Questions of 96 to 139 tokens (tests/data/gsm8k.jsonl): --max_length 100 keeps one record's target, 90 none
    (its loss would be 0 / 0: one error line, nothing written)."""
    common = ["--model_name_or_path", str(models["base"]), "--rank", "4", "--init", "lora", "--data",
              str(DATA / "gsm8k.jsonl"), "--eval_data", str(DATA / "gsm8k.jsonl"), "--max_steps", "1", *FP32]
    results = train_gsm8k.main([*common, "--max_length", "100", "--output_dir", str(tmp_path / "kept")])
    assert results["n_train"] == results["n_held_out"] == 1 and math.isfinite(results["train_loss"])
    assert "5 of 6 training records have no target token within --max_length: left out" in caplog.text
    with pytest.raises(ValueError, match="no training record keeps a target token within --max_length 90"):
        train_gsm8k.main([*common, "--max_length", "90", "--output_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


def test_gsm8k_width_search_on_the_held_out_split_then_test_with_the_chosen_width(models, tmp_path):
    common = ["--model_name_or_path", str(models["base"]), "--rank", "4", "--init", "lora", "--data",
              str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "3", "--learning_rate", "0.05",
              "--llmmscale", "4", "--per_device_eval_batch_size", "1", *FP32, *FAST]
    plain = train_gsm8k.main([*common, "--output_dir", str(tmp_path / "none")])
    searched = train_gsm8k.main([*common, "--noise_width_search", "nll", "--mc_samples", "2", "--output_dir",
                                 str(tmp_path / "nll")])
    record = searched["noise_width_search"]
    assert record["rule"] == "nll" and record["chosen"] == record["nll_min"] == searched["noise_width"]
    assert record["n_held_out"] == 3 and record["mc_samples"] == 2 and "held out of train" in record["split"]
    nll = dict(record["evaluations"])
    assert nll[0.0] == pytest.approx(searched["eval_loss"], rel=1e-5)  # m = 0: the mean network's held-out loss
    assert nll[record["chosen"]] == min(nll.values()) and len(set(nll.values())) > 1  # the width matters
    assert LlmmConfig.from_pretrained(str(tmp_path / "nll" / "adapter")).noise_width == record["chosen"]
    assert searched["cell"]["noise_width_search"] == "nll" and searched["cell"]["mc_samples"] == 2
    # none is the run as before, bit for bit: the search comes after training and changes only the width m.
    assert plain["noise_width_search"] is None and plain["noise_width"] == 1.0
    assert LlmmConfig.from_pretrained(str(tmp_path / "none" / "adapter")).noise_width == 1.0
    untimed = [[{k: v for k, v in h.items() if not re.search("runtime|per_second", k)} for h in run["history"]]
               for run in (plain, searched)]
    assert untimed[0] == untimed[1] and plain["eval_loss"] == searched["eval_loss"]
    for name in ("adapter", "mean_adapter"):
        a, b = (load_file(tmp_path / run / name / "adapter_model.safetensors") for run in ("none", "nll"))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # test_gsm8k's mc mode draws its networks with the chosen m, and says so.
    results = test_gsm8k.main(["--adapter", str(tmp_path / "nll" / "adapter"), "--output_dir", str(tmp_path / "mc"),
                               "--mode", "mc", "--mc_samples", "2", "--max_samples", "2", *GENERATE, *FP32])
    assert results["noise_width"] == record["chosen"]
    with pytest.raises(ValueError, match="which here is the test split: pass --eval_split heldout"):
        train_gsm8k.main([*common, "--eval_split", "test", "--noise_width_search", "tfb", "--output_dir",
                          str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"which --method qlora \(K = 0\) does not have"):
        train_gsm8k.main([*common, "--method", "qlora", "--noise_width_search", "tfb", "--output_dir",
                          str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_mc_networks_draw_the_noise_m_times_as_wide():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    layer = llmm_layers(model)[0]
    mean = layer.lora_A["default"].weight.detach().clone()
    draws = {}
    for width in (1.0, 2.0, 0.0):
        for settings in layer.llmm_settings.values():
            settings["width"] = width
        with gsm8k_test.sampled_network(model, seed=3):
            draws[width] = layer.lora_A["default"].weight.detach() - mean
    torch.testing.assert_close(draws[2.0], 2 * draws[1.0])
    assert draws[1.0].abs().max() > 0 and torch.equal(draws[0.0], torch.zeros_like(mean))


def test_mc_networks_are_fixed_draws_and_the_means_come_back():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    model.eval()
    layer, inputs = llmm_layers(model)[0], torch.randint(0, 128, (1, 8))
    mean = layer.lora_A["default"].weight.detach().clone()
    with torch.no_grad():
        at_mean = model(inputs).logits
        with gsm8k_test.sampled_network(model, seed=3):
            first, again = model(inputs).logits, model(inputs).logits
            draw = layer.lora_A["default"].weight.detach() - mean
        with gsm8k_test.sampled_network(model, seed=3):
            same_seed = model(inputs).logits
        with gsm8k_test.sampled_network(model, seed=4):
            other_seed = model(inputs).logits
        restored = model(inputs).logits
    assert torch.equal(first, again) and torch.equal(first, same_seed)  # one network per draw, seeded
    assert not torch.allclose(first, other_seed) and not torch.allclose(first, at_mean)
    assert torch.equal(restored, at_mean)
    # The draw is sum_k eps_k / sqrt(s) Z[k]: in the span of the K directions, with O(1) coefficients eps_k.
    directions = layer.lora_llmm_A["default"].weight.detach().flatten(1).T  # (numel, K)
    eps = torch.linalg.lstsq(directions, draw.flatten()[:, None]).solution.flatten() * 400 ** 0.5
    torch.testing.assert_close(directions @ eps / 400 ** 0.5, draw.flatten(), rtol=1e-4, atol=1e-5)
    assert 1e-3 < eps.abs().max() < 6


def test_sample_mode_noise_follows_the_seed_flag(monkeypatch):
    """--mode sample: the Llmm noise comes from the model's own generator, seeded by --seed (and the process), not
    by whatever seeded torch before the model was loaded."""
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2,
                                                    eval_noise="sample"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    model.eval()
    inputs = torch.randint(0, 128, (1, 8))

    def generate(model, tokenizer, prompts, settings):  # one noisy forward stands for the generation
        with torch.no_grad():
            return [repr(model(inputs).logits.sum().item())] * len(prompts)

    monkeypatch.setattr(gsm8k_test, "generate", generate)
    records = [{"question": "one plus two", "answer": "3 #### 3"}]
    tokenizer = byte_level_tokenizer()

    def generated(seed):
        torch.manual_seed(1234 + seed)  # torch's generator must not decide the noise
        settings = Gsm8kTestRun.of({"mode": "sample", "seed": seed})
        return gsm8k_test.predict(model, tokenizer, records, settings)[0]["generated"]

    assert generated(0) == generated(0) != generated(1)


# --- the paper's precision: NF4 backbone, bfloat16 compute, float32 adapters under bf16 autocast ---------------------

NF4_BF16 = ["--load_in_4bit", "true", "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def bf16_init_dir(models, tmp_path_factory):
    """bash _init.sh as the paper's runs use it: LoftQ NF4 (rank 64), the backbone Q saved in bfloat16."""
    return quantize_model.main([
        "--model", str(models["base"]), "--save_dir", str(tmp_path_factory.mktemp("bf16")), "--rank", "64",
        "--bits", "4", "--K", "2", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "bfloat16"])


def test_paper_configuration_nf4_bf16_train_resume_export_generate(bf16_init_dir, tmp_path):
    settings = CausalLMRun.of({"model_name_or_path": str(bf16_init_dir), "load_in_4bit": True, "dtype": "bfloat16",
                               "prepare_kbit_training": True, "gradient_checkpointing": False, "init": "loftq",
                               "K": 2, "rank": 64, "lora_alpha": 16, "llmmscale": 400.0, "scaled_gradient": True,
                               "lora_dropout": 0.1, "eval_noise": "mean"})
    model, _ = load_backbone(settings)
    model = attach_adapter(prepare_for_training(model, settings), settings)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.dtype.is_floating_point}
    # The reference's prepare_model_for_kbit_training: norms, embeddings and lm_head in float32; adapters float32.
    assert all(dtype == torch.float32 for dtype in dtypes.values()), {n: d for n, d in dtypes.items()
                                                                      if d != torch.float32}
    assert any("lora_llmm_A" in name for name in dtypes) and any("norm" in name for name in dtypes)
    del model

    run = tmp_path / "run"
    argv = ["--model_name_or_path", str(bf16_init_dir), "--data", str(DATA / "gsm8k.jsonl"), "--eval_split",
            "heldout", "--eval_size", "2", "--output_dir", str(run), "--save_steps", "1", "--logging_steps", "1",
            *NF4_BF16]
    train_gsm8k.main([*argv, "--max_steps", "1"])
    results = train_gsm8k.main([*argv, "--max_steps", "2", "--resume_from_checkpoint"])
    assert results["global_step"] == 2 and results["resumed_from"].endswith("checkpoint-1")
    assert math.isfinite(results["eval_loss"]) and results["eval_loss"] != results["eval_loss_at_start"]
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values()) and any(
        t.abs().max() > 0 for k, t in saved.items() if "lora_llmm_" in k)  # fp32 M and Z; Z grew

    test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / "mean"), *GENERATE, *NF4_BF16])
    predictions, _ = check_predictions(tmp_path / "mean")
    # Whichever tool evaluates the exported mean adapter (plain PEFT, lm-eval), the generations are the same.
    assert [p["generated"] for p in predictions] == plain_peft_generations(
        bf16_init_dir, run / "mean_adapter", load_in_4bit=True, dtype="bfloat16")
    for mode in ("sample", "mc"):
        networks = ["--mc_samples", "2"] if mode == "mc" else []  # sample mode draws one network
        test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / mode), "--mode", mode,
                         *networks, "--max_samples", "2", *GENERATE, *NF4_BF16])
        predictions, _ = check_predictions(tmp_path / mode, n=2)
        assert all(len(p["votes"]) == 2 for p in predictions) if mode == "mc" else True

    # Mean mode over NF4 in bf16 does PEFT's own LoRA arithmetic: identical logits, bit for bit.
    inputs = torch.randint(4, 250, (2, 16))
    logits = []
    for load in (lambda base: load_llmm_model(base, str(run / "adapter")),
                 lambda base: PeftModel.from_pretrained(base, str(run / "mean_adapter"))):
        backbone, _ = load_backbone(settings.copy(model_name_or_path=str(bf16_init_dir)))
        with torch.no_grad():
            logits.append(load(backbone).eval()(input_ids=inputs).logits)
    assert logits[0].dtype == torch.bfloat16 and torch.equal(logits[0], logits[1])


def test_in_process_loftq_bf16_backbone_requantizes_to_the_same_nf4(models, tmp_path):
    """In-process LoftQ over a bfloat16 backbone saves Q with a bf16 absmax: test_gsm8k's NF4 load of backbone/
    (bitsandbytes re-quantizes it) holds exactly Q again."""
    run = tmp_path / "run"
    train_gsm8k.main(["--rank", "16", "--model_name_or_path", str(models["base"]), "--init", "loftq",
                      "--loftq_iter", "1", "--data", str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout",
                      "--eval_size", "2", "--output_dir", str(run), "--max_steps", "1", *BF16])
    saved = load_file(run / "backbone" / "model.safetensors")
    model, _ = load_backbone(CausalLMRun.of({"model_name_or_path": str(run / "backbone"), "load_in_4bit": True,
                                             "dtype": "bfloat16"}))
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            q = saved[f"{name}.weight"]
            dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert q.dtype == torch.bfloat16 and torch.equal(dequantized.to(q.dtype), q), name
            checked += 1
    assert checked == 2 * 7


# --- any model, any rank, any data -----------------------------------------------------------------------------------

def test_any_model_and_rank_run_from_the_defaults_with_a_dataset_directory(models, tmp_path, capsys):
    dataset = tmp_path / "gsm8k"  # a local dataset directory with train and test splits; no 'main' config
    dataset.mkdir()
    lines = (DATA / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    (dataset / "train.jsonl").write_text("".join(lines[:4]))
    (dataset / "test.jsonl").write_text("".join(lines[4:]))
    run = tmp_path / "run"
    results = train_gsm8k.main(["--model_name_or_path", str(models["base"]), "--rank", "8", "--init", "lora",
                                "--data", str(dataset), "--output_dir", str(run), *FP32, *FAST])
    settings = read(run / "settings.json")
    assert settings["rank"] == 8 and settings["table_row"] is None and settings["dataset_config"] is None
    assert results["held_out"] == f"{dataset} [test]" and results["n_held_out"] == 2
    assert LlmmConfig.from_pretrained(str(run / "adapter")).r == 8
    test_gsm8k.main(["--adapter", str(run / "adapter"), "--data", str(dataset), "--output_dir", str(tmp_path / "t"),
                     "--max_new_tokens", "4", *FP32])
    assert read(tmp_path / "t" / "results.json")["n"] == 2

    with pytest.raises(ValueError, match=r"no row for \{'model': 'llama-2-7b', 'rank': 16\}.*drop --model"):
        train_gsm8k.main(["--model", "llama-2-7b", "--rank", "16", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--eval_size, --eval_split test .* --eval_data"):
        train_gsm8k.main(["--model_name_or_path", str(models["base"]), "--init", "lora", "--data",
                          str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout", "--output_dir", str(tmp_path / "y"),
                          *FP32, *FAST])
    with pytest.raises(SystemExit):
        train_nlg.main(["--help"])
    help_text = capsys.readouterr().out
    assert "--rank" in help_text and re.search(r"--source\b", help_text) is None  # the row's provenance is no flag


def test_table_defaults_or_a_named_row():
    table = {"keys": ["task", "model", "rank"], "columns": ["base_model", "dataset"],
             "defaults": {"rank": 16, "learning_rate": 1e-4},
             "rows": [{"task": "a", "model": "m", "rank": 16, "base_model": "org/m", "dataset": "d/a", "source": "x"},
                      {"task": "a", "model": "n", "rank": 16, "base_model": "org/n", "dataset": "d/a", "source": "x"},
                      {"task": "a", "model": "n", "rank": 64, "base_model": "org/n", "dataset": "d/a", "source": "x"}]}

    def resolve(**flags):
        args = argparse.Namespace(**{"task": "a", "model": None, "rank": None, "learning_rate": None, **flags})
        return table_settings(table, args, task_columns=("dataset",))

    plain = resolve(rank=8)
    assert plain["rank"] == 8 and plain["dataset"] == "d/a" and "base_model" not in plain and plain["table_row"] is None
    assert resolve(model="m")["base_model"] == "org/m"  # the model's only row
    assert resolve(model="n", rank=64, learning_rate=2e-4)["learning_rate"] == 2e-4  # flags win over the row
    with pytest.raises(ValueError, match="2 rows for"):
        resolve(model="n")
    by_task = {"keys": ["task"], "defaults": {"rank": 8}, "rows": [{"task": "a", "rank": 4, "source": "x"}]}
    assert table_settings(by_task, argparse.Namespace(task="a", rank=None))["rank"] == 4  # no model key: named


# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_training_input_fails_before_loading(models, tmp_path):
    nlg = ["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", "--data", str(DATA / "alpaca.jsonl"),
           "--output_dir", str(tmp_path / "run"), *FAST]
    with pytest.raises(ValueError, match="--method qlora needs the original checkpoint"):
        train_nlg.main([*nlg, "--method", "qlora", "--model_name_or_path", str(models[16])])
    with pytest.raises(ValueError, match="LoftQ init needs the full-precision weights"):
        train_nlg.main([*nlg, "--model_name_or_path", str(models["base"]), *NF4])
    with pytest.raises(ValueError, match="trains plain LoRA factors"):
        train_nlg.main([*nlg, "--method", "loftq", "--K", "2", "--model_name_or_path", str(models[16])])
    with pytest.raises(FileNotFoundError, match="create it with bash _init.sh"):
        train_nlg.main(nlg)  # the row's init_dir (quantized/...) does not exist here
    with pytest.raises(ValueError, match="holds LoftQ means for r=16 but the settings say rank=64"):
        train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(models[16]),
                          "--data", str(DATA / "gsm8k.jsonl"), "--output_dir", str(tmp_path / "r"), *FP32, *FAST])
    with pytest.raises(ValueError, match="no 'test' split"):
        train_nlg.main(["--task", "hh-rlhf", "--model", "llama-2-7b", "--rank", "16", "--model_name_or_path",
                        str(models[16]), "--data", str(DATA / "hh_rlhf.jsonl"), "--output_dir",
                        str(tmp_path / "hh"), *FP32, *FAST])
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "How many?"}\n')
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['answer'\]"):
        train_gsm8k.main(["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(models[64]),
                          "--data", str(no_answer), "--output_dir", str(tmp_path / "g"), *FP32, *FAST])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        train_nlg.main([*nlg, "--model_name_or_path", str(models[16]), "--output_dir", str(tmp_path / "full")])


def test_bad_test_input_fails_before_loading(models, tmp_path):
    adapter = models[64] / "llmm_init"  # an Llmm adapter with K = 2
    base = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(models[64]), *GENERATE, *FP32]
    with pytest.raises(FileNotFoundError, match="adapter directory .* does not exist"):
        test_gsm8k.main(["--adapter", str(tmp_path / "missing"), *base])
    with pytest.raises(ValueError, match="has K=2 but --K 3 was given"):
        test_gsm8k.main(["--adapter", str(adapter), "--K", "3", *base])
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "How many?"}\n')
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['answer'\]"):
        test_gsm8k.main(["--adapter", str(adapter), *base, "--data", str(no_answer)])
    with pytest.raises(ValueError, match="applies only with sampled decoding"):
        test_gsm8k.main(["--adapter", str(adapter), "--temperature", "0.5", *base])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        test_gsm8k.main(["--adapter", str(adapter), *base])


def test_output_to_a_log_file_is_lines_not_redrawn_bars(models, tmp_path):
    """Output sent to a file (no terminal): quantize_model logs LoftQ's progress as lines and train_gsm8k prints the
    Trainer's logs, with no progress bar's carriage returns from llmm, transformers or datasets."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    commands = [["quantize_model", "--model", str(models["base"]), "--save_dir", str(tmp_path / "q"), "--rank", "8",
                 "--bits", "4", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "float32"],
                ["train_gsm8k", "--model_name_or_path", str(models[16]), "--data", str(DATA / "gsm8k.jsonl"),
                 "--rank", "16", "--eval_split", "heldout", "--eval_size", "2", "--output_dir", str(tmp_path / "run"),
                 *FP32, *FAST]]
    outputs = []
    for script, *argv in commands:
        done = subprocess.run([sys.executable, "-m", f"scripts.{script}", *argv], cwd=REPO_ROOT, capture_output=True,
                              env=env)  # bytes: text mode would turn a bar's carriage returns into newlines
        output = (done.stdout + done.stderr).decode()
        assert done.returncode == 0 and "\r" not in output, output[-2000:]
        outputs.append(output)
    assert re.search(r"LoftQ( \(streamed\))?: \d+ / \d+ (tensor|layer)s", outputs[0])
    assert re.search(r"\{'loss': '?[0-9.]+", outputs[1])  # the Trainer's log line for each logging step


@pytest.mark.parametrize("script, argv, message", [
    ("test_gsm8k", ["--adapter", "no/such/adapter", "--output_dir", "{tmp}/out"],
     "error: adapter directory 'no/such/adapter' does not exist"),
    ("train_nlg", ["--task", "alpaca", "--model", "llama-2-7b", "--rank", "16", "--method", "qlora",
                   "--model_name_or_path", "org/some-model", "--output_dir", "{tmp}"], "error: output directory"),
])
def test_command_line_errors_exit_2_with_one_line(tmp_path, script, argv, message):
    (tmp_path / "something").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-m", f"scripts.{script}", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), done.stderr[-2000:]
    assert "kernels-community" not in done.stderr  # library noise is filtered (llmm.run.quiet)
