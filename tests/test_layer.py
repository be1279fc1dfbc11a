"""The Gaussian factor and the Llmm layer: sampling, covariance, gradients, equivalence with plain LoRA."""

import math

import pytest
import torch
from conftest import DEBERTA_TARGETS, LLAMA_TARGETS, tiny_deberta, tiny_llama
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from llmm import LlmmConfig, get_llmm_model, llmm_layers, noise_mode, noise_source, sample_factor, seed_noise


def randomize(model, means=True, directions=True, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if (means and (".lora_A." in name or ".lora_B." in name)) or (directions and "lora_llmm_" in name):
            param.data = torch.randn(param.shape, generator=generator) * 0.2


@pytest.mark.parametrize("family", ["llama", "deberta"])
def test_mean_mode_equals_plain_lora(family):
    build, targets = (tiny_llama, LLAMA_TARGETS) if family == "llama" else (tiny_deberta, DEBERTA_TARGETS)
    extra = {"modules_to_save": ["classifier", "pooler"]} if family == "deberta" else {}
    llmm_model = get_llmm_model(build(), LlmmConfig(r=4, lora_alpha=8, target_modules=targets, k=2, **extra))
    randomize(llmm_model)
    plain = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    state = {k: v for k, v in get_peft_model_state_dict(llmm_model).items() if "lora_llmm_" not in k}
    set_peft_model_state_dict(plain, state)
    llmm_model.eval(), plain.eval()
    inputs = torch.randint(0, 128, (3, 12))
    with torch.no_grad():
        expected = plain(inputs).logits
        got = llmm_model(inputs).logits
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_train_mode_samples_and_zero_directions_give_the_mean():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=3))
    randomize(model, directions=False)
    inputs = torch.randint(0, 128, (2, 8))
    model.eval()
    mean_out = model(inputs).logits
    model.train()
    torch.testing.assert_close(model(inputs).logits, mean_out, rtol=0, atol=0)  # Z = 0: the sample is the mean
    randomize(model, means=False)
    first, second = model(inputs).logits, model(inputs).logits
    assert (first - second).abs().max() > 1e-3
    seed_noise(model, 7)
    again = model(inputs).logits
    seed_noise(model, 7)
    torch.testing.assert_close(model(inputs).logits, again, rtol=0, atol=0)  # seedable
    model.eval()
    torch.testing.assert_close(model(inputs).logits, mean_out, rtol=0, atol=0)  # eval_noise="mean"
    with noise_mode(model, "sample"):
        assert (model(inputs).logits - mean_out).abs().max() > 1e-3


def test_empirical_covariance_matches_directions():
    torch.manual_seed(0)
    k, scale, n = 3, 4.0, 40000
    mean, directions = torch.randn(2, 3, dtype=torch.float64), torch.randn(k, 2, 3, dtype=torch.float64)
    eps = torch.randn(n, k, dtype=torch.float64)
    samples = torch.stack([sample_factor(mean, directions, e, scale).reshape(-1) for e in eps])
    flat = directions.reshape(k, -1)
    torch.testing.assert_close(samples.mean(0), mean.reshape(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), flat.T @ flat / scale, atol=0.05, rtol=0.05)


def test_layer_draws_one_eps_per_factor_per_forward():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj"], k=2))
    randomize(model)
    model.train()
    layer = llmm_layers(model)[0]
    seed_noise(model, 3)
    eps = torch.randn(2, 2, generator=noise_source(model).generator(torch.device("cpu")))
    seed_noise(model, 3)
    factor_A, factor_B = layer.lora_variant["default"].factors(layer, "default")
    again = layer.lora_variant["default"].factors(layer, "default")
    torch.testing.assert_close(again[0], factor_A, rtol=0, atol=0)  # one draw per model forward
    noise_source(model).new_forward()
    assert not torch.equal(layer.lora_variant["default"].factors(layer, "default")[0], factor_A)
    scale = layer.llmm_settings["default"]["scale"]
    expected_A = layer.lora_A["default"].weight + torch.einsum("k,kij->ij", eps[0] / math.sqrt(scale),
                                                               layer.lora_llmm_A["default"].weight)
    expected_B = layer.lora_B["default"].weight + torch.einsum("k,kij->ij", eps[1] / math.sqrt(scale),
                                                               layer.lora_llmm_B["default"].weight)
    torch.testing.assert_close(factor_A, expected_A)
    torch.testing.assert_close(factor_B, expected_B)


@pytest.mark.parametrize("scaled", [True, False])
def test_sample_factor_gradients(scaled):
    torch.manual_seed(0)
    scale = 400.0
    mean = torch.randn(4, 5, requires_grad=True)
    directions = torch.randn(2, 4, 5, requires_grad=True)
    eps = torch.randn(2)
    weight = torch.randn(4, 5)
    (sample_factor(mean, directions, eps, scale, scaled_gradient=scaled) * weight).sum().backward()
    mean_ref, directions_ref = mean.detach().clone().requires_grad_(), directions.detach().clone().requires_grad_()
    plain = mean_ref + torch.einsum("k,kij->ij", eps / math.sqrt(scale), directions_ref)
    (plain * weight).sum().backward()
    torch.testing.assert_close(mean.grad, mean_ref.grad)  # dM = g
    factor = math.sqrt(scale) if scaled else 1.0  # scaled: dZ[k] = eps_k g; plain: eps_k g / sqrt(s)
    torch.testing.assert_close(directions.grad, directions_ref.grad * factor)
    torch.testing.assert_close(directions.grad[1], eps[1] * weight / (1.0 if scaled else math.sqrt(scale)))


def test_gradcheck_plain_pathwise():
    torch.manual_seed(0)
    mean = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    directions = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, z: sample_factor(m, z, eps, 9.0, scaled_gradient=False),
                                    (mean, directions))


def test_merge_equals_mean_and_unmerge_restores():
    torch.manual_seed(0)
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
    randomize(model)
    model.eval()
    inputs = torch.randint(0, 128, (2, 8))
    expected = model(inputs).logits
    weight_before = llmm_layers(model)[0].get_base_layer().weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(model(inputs).logits, expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    # W + dW - dW is W up to float32 rounding of the weights, which the logits carry through two layers
    torch.testing.assert_close(llmm_layers(model)[0].get_base_layer().weight, weight_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_k_zero_is_plain_lora_even_in_train_mode():
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=0))
    randomize(model)
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    set_peft_model_state_dict(plain, get_peft_model_state_dict(model))
    inputs = torch.randint(0, 128, (2, 8))
    model.train(), plain.train()
    with torch.no_grad():
        got, expected = model(inputs).logits, plain(inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert all(p.numel() == 0 for n, p in model.named_parameters() if "lora_llmm_" in n)


def test_gradient_checkpointing_recomputes_the_same_sample():
    """Checkpointing re-runs the forward in backward; torch restores only its own RNG states, so the layers reuse
    the eps of their forward (not a second draw from the noise generator): the gradients are the same."""
    grads, states = [], []
    for checkpointing in (False, True):
        model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        inputs = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        seed_noise(model, 11)
        model(inputs, labels=inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_llmm_" in n})
        states.append(noise_source(model).generator(torch.device("cpu")).get_state())
    assert torch.equal(states[0], states[1])  # the re-run drew nothing: the next step's noise is the same too
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_scaled_gradient_setting_reaches_the_layer():
    """Under the same seed, the layer's Z gradient with scaled_gradient=True is sqrt(s) times the plain one."""
    grads = {}
    for scaled in (True, False):
        config = LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj"], k=2, scale=16.0, scaled_gradient=scaled)
        model = get_llmm_model(tiny_llama(), config)
        randomize(model)
        model.train()
        inputs = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        seed_noise(model, 5)
        model(inputs, labels=inputs).loss.backward()
        grads[scaled] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[True].items():
        factor = math.sqrt(16.0) if "lora_llmm_" in name else 1.0
        torch.testing.assert_close(grad, grads[False][name] * factor, rtol=1e-5, atol=1e-7)
