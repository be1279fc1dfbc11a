"""CUDA paths (opt-in: marked ``gpu``, skipped without CUDA): noise on the device, LoftQ on CUDA, NF4 on CUDA."""

import pytest
import torch
from conftest import LLAMA_TARGETS, tiny_llama
from test_layer import randomize
from test_model import CONFIG

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
