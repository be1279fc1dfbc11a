"""CUDA paths (opt-in: marked ``gpu``, skipped without CUDA): noise on the device, LoftQ on CUDA, NF4 on CUDA, and
the paper's configuration end to end. Run them with the benchmarks: bash benchmarks/gpu_check.sh (prepared, not yet
run on a GPU)."""

import pytest
import torch
from conftest import LLAMA_TARGETS, tiny_llama
from test_layer import randomize
from test_model import CONFIG

from llmm.run.schema import CausalLMRun
from llmm import LlmmConfig, get_llmm_model, llmm_layers, load_llmm_model
from llmm.quant import fake_quantize, loftq_init

pytestmark = pytest.mark.gpu


def test_layer_samples_on_the_device_and_matches_cpu_in_mean_mode():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
    randomize(model)
    inputs = torch.randint(0, 128, (2, 8))
    model.eval()
    expected = model(inputs).logits
    model.to("cuda")
    torch.testing.assert_close(model(inputs.cuda()).logits.cpu(), expected, atol=1e-4, rtol=1e-4)
    model.train()
    first, second = model(inputs.cuda()).logits, model(inputs.cuda()).logits
    assert (first - second).abs().max() > 1e-4  # sampled on the GPU
    model(inputs.cuda(), labels=inputs.cuda()).loss.backward()
    assert all(p.grad is not None and p.grad.is_cuda for n, p in model.named_parameters() if "lora_llmm_" in n)


def test_quantizers_and_loftq_on_cuda_match_cpu():
    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.02
    for bits in (2, 4, 8):
        torch.testing.assert_close(fake_quantize(weight.cuda(), bits).cpu(), fake_quantize(weight, bits))
    q_cuda, a_cuda, b_cuda = loftq_init(weight.cuda(), bits=2, rank=8, num_iter=3)
    q_cpu, a_cpu, b_cpu = loftq_init(weight, bits=2, rank=8, num_iter=3)
    torch.testing.assert_close((q_cuda + b_cuda @ a_cuda).cpu(), q_cpu + b_cpu @ a_cpu, atol=1e-4, rtol=1e-3)


def test_nf4_bitsandbytes_base_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")

    def load():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization,
                                                    device_map="cuda", dtype=torch.float32)

    model = get_llmm_model(load(), LlmmConfig(k=2, **CONFIG))
    assert type(llmm_layers(model)[0]).__name__ == "LlmmLinear4bit"
    inputs = torch.randint(0, 128, (2, 8), device="cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    loaded = load_llmm_model(load(), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits)


# --- the paper's configuration on CUDA: _init.sh, NF4 + bf16 training with resume, every generation mode,
# plain-PEFT reload, in-process LoftQ on the device, DeBERTa GLUE. Run by benchmarks/gpu_check.sh.

def _requantized_exactly(backbone_dir, model) -> int:
    """Every bitsandbytes NF4 weight of ``model`` dequantizes to exactly the 16-bit Q saved in ``backbone_dir``."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    saved, checked = load_file(str(backbone_dir / "model.safetensors")), 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            q = saved[f"{name}.weight"].to(module.weight.device)
            dequantized = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(dequantized.to(q.dtype), q), name
            checked += 1
    return checked


@pytest.fixture(scope="module")
def cuda_llama(tmp_path_factory):
    """A tiny Llama and its _init.sh directory (LoftQ on CUDA, Q saved in bfloat16, rank 64)."""
    from test_llama_scripts import save_tiny_llama

    from scripts import quantize_model

    root = tmp_path_factory.mktemp("cuda_llama")
    base = save_tiny_llama(root / "base")
    init = quantize_model.main(["--model", str(base), "--save_dir", str(root / "q"), "--rank", "64", "--bits", "4",
                                "--K", "2", "--loftq_iter", "2", "--lora_alpha", "16", "--dtype", "bfloat16",
                                "--device", "cuda"])
    return {"base": base, "init": init}


def test_init_sh_backbone_reloads_exactly_in_nf4_through_cuda_kernels(cuda_llama):
    from llmm.run.causal_lm import load_backbone

    model, _ = load_backbone(CausalLMRun.of({"model_name_or_path": str(cuda_llama["init"]), "load_in_4bit": True,
                                             "dtype": "bfloat16"}))
    assert next(model.parameters()).is_cuda and _requantized_exactly(cuda_llama["init"], model) == 2 * 7


def test_paper_configuration_on_cuda_train_resume_generate_export(cuda_llama, tmp_path):
    from peft import PeftModel
    from test_llama_scripts import DATA, GENERATE, check_predictions, plain_peft_generations

    from scripts import test_gsm8k, train_gsm8k
    from llmm.run.causal_lm import load_backbone

    nf4_bf16 = ["--load_in_4bit", "true", "--dtype", "bfloat16"]
    run = tmp_path / "run"
    argv = ["--model_name_or_path", str(cuda_llama["init"]), "--data", str(DATA / "gsm8k.jsonl"), "--eval_split",
            "heldout", "--eval_size", "2", "--output_dir", str(run), "--save_steps", "1", "--logging_steps", "1",
            *nf4_bf16]
    train_gsm8k.main([*argv, "--max_steps", "1"])
    results = train_gsm8k.main([*argv, "--max_steps", "2", "--resume_from_checkpoint"])
    assert results["global_step"] == 2 and results["resumed_from"].endswith("checkpoint-1")
    assert results["eval_loss"] != results["eval_loss_at_start"]
    for mode in ("mean", "sample", "mc"):
        test_gsm8k.main(["--adapter", str(run / "adapter"), "--output_dir", str(tmp_path / mode), "--mode", mode,
                         *(["--mc_samples", "2"] if mode == "mc" else []), *GENERATE, *nf4_bf16])
        predictions, _ = check_predictions(tmp_path / mode)
        if mode == "mean":
            assert [p["generated"] for p in predictions] == plain_peft_generations(
                cuda_llama["init"], run / "mean_adapter", load_in_4bit=True, dtype="bfloat16")
    settings = CausalLMRun.of({"model_name_or_path": str(cuda_llama["init"]), "load_in_4bit": True,
                               "dtype": "bfloat16"})
    inputs = torch.randint(4, 250, (2, 16), device="cuda")
    from llmm import load_llmm_model as load

    logits = []
    for attach in (lambda base: load(base, str(run / "adapter")),
                   lambda base: PeftModel.from_pretrained(base, str(run / "mean_adapter"))):
        with torch.no_grad():
            logits.append(attach(load_backbone(settings)[0]).eval()(input_ids=inputs).logits)
    assert torch.equal(logits[0], logits[1])  # the plain-PEFT reload of the exported mean adapter


def test_in_process_loftq_runs_on_the_training_device(cuda_llama, tmp_path, monkeypatch):
    import llmm.layer
    from test_llama_scripts import DATA

    from scripts import train_gsm8k
    from llmm.run.causal_lm import load_backbone

    devices, loftq_factors = [], llmm.layer.loftq_factors

    def recording(weight, *args, **kwargs):
        devices.append(weight.device.type)
        return loftq_factors(weight, *args, **kwargs)

    monkeypatch.setattr(llmm.layer, "loftq_factors", recording)
    run = tmp_path / "run"
    train_gsm8k.main(["--rank", "16", "--model_name_or_path", str(cuda_llama["base"]), "--init", "loftq",
                      "--loftq_iter", "2", "--data", str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout",
                      "--eval_size", "2", "--output_dir", str(run), "--max_steps", "1", "--load_in_4bit", "false",
                      "--dtype", "bfloat16"])
    assert devices and set(devices) == {"cuda"}
    model, _ = load_backbone(CausalLMRun.of({"model_name_or_path": str(run / "backbone"), "load_in_4bit": True,
                                              "dtype": "bfloat16"}))
    assert _requantized_exactly(run / "backbone", model) == 2 * 7


def test_deberta_glue_two_steps_on_cuda(tmp_path):
    import json

    from test_glue import DATA, save_tiny_model

    from scripts import train_glue

    model_dir = save_tiny_model(tmp_path / "deberta")
    train_glue.main(["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--eval_noise", "mc",
                     "--mc_samples", "2", "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                     "--per_device_eval_batch_size", "8", "--model", model_dir, "--data_dir", str(DATA), "--output_dir",
                     str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["complete"] and results["last"]["train_loss"] is not None
    dev = results["last"]["dev"]["validation"] if "validation" in results["last"]["dev"] else next(
        iter(results["last"]["dev"].values()))
    assert {"nll", "brier", "ece"} <= set(dev)  # Monte-Carlo evaluation ran on the GPU
