"""Quantizers and LoftQ: NF4 equals bitsandbytes, level counts, error ordering, LoftQ improvement, compensation."""

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft import LoftQConfig

from llmm import LlmmConfig, get_llmm_model
from llmm.quant import fake_quantize, loftq_init


def test_nf4_equals_bitsandbytes():
    torch.manual_seed(0)
    for shape in [(96, 128), (40, 192)]:  # rows a multiple of the block, as bnb's CPU dequant kernel needs
        weight = torch.randn(shape) * 0.02
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(fake_quantize(weight, 4, "nf", 64), dequantize_4bit(packed, state))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_level_counts(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    blocks = fake_quantize(weight, bits, "nf").view(-1, 64)
    assert max(len(torch.unique(block)) for block in blocks) <= 2**bits
    uniform = fake_quantize(weight, bits, "uniform")
    assert len(torch.unique(uniform)) <= 2**bits
    low, high = weight.mean() - 2 * weight.std(), weight.mean() + 2 * weight.std()
    assert uniform.min() >= low - 1e-5 and uniform.max() <= high + 1e-5


@pytest.mark.parametrize("method", ["nf", "uniform"])
def test_error_falls_as_bits_rise(method):
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    errors = [torch.linalg.norm(weight - fake_quantize(weight, b, method)) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("method,bits", [("nf", 2), ("nf", 4), ("uniform", 2)])
def test_loftq_beats_plain_quantization_and_does_not_degrade(method, bits):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) @ torch.diag(torch.linspace(2, 0.1, 128))
    plain_error = torch.linalg.norm(weight - fake_quantize(weight, bits, method))
    errors = []
    for iters in (1, 2, 5):
        q, lora_A, lora_B = loftq_init(weight, bits, rank=8, num_iter=iters, method=method)
        assert lora_A.shape == (8, 128) and lora_B.shape == (96, 8)
        errors.append(torch.linalg.norm(weight - q - lora_B @ lora_A))
    assert errors[0] < plain_error
    assert errors[-1] <= errors[0] * 1.001


def test_absmax_dtype_makes_16bit_copy_requantize_losslessly():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    q = fake_quantize(weight, 4, "nf", absmax_dtype=torch.bfloat16).to(torch.bfloat16)
    packed, state = quantize_4bit(q.float(), blocksize=64, quant_type="nf4")
    assert torch.equal(dequantize_4bit(packed, state).to(torch.bfloat16), q)


def _effective_weight(compensate, alpha):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    original = layer[0].weight.detach().clone()
    config = LlmmConfig(r=8, lora_alpha=alpha, target_modules=["0"], k=1, init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=2, loftq_iter=3), loftq_compensate_scaling=compensate)
    model = get_llmm_model(layer, config)
    model.merge_adapter()
    return original, model.base_model.model[0].get_base_layer().weight.detach()


def test_scaling_compensation_reproduces_weight_better():
    original, compensated = _effective_weight(True, alpha=16)
    _, reference = _effective_weight(False, alpha=16)
    assert torch.linalg.norm(original - compensated) < 0.8 * torch.linalg.norm(original - reference)
    _, equal_at_alpha_r = _effective_weight(False, alpha=8)
    torch.testing.assert_close(compensated, equal_at_alpha_r, atol=1e-5, rtol=1e-5)
