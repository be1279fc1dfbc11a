"""Where the K directions live: leaf modules with a ``.weight`` (so FSDP shards them with the means), and saved
adapters in both the current layout and the one written before (``tests/data/legacy_adapter``)."""

from pathlib import Path

import torch
from conftest import tiny_llama
from peft import PeftModel
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import load_file, save_file

from llmm import (LlmmConfig, export_mean_adapter, get_llmm_model, init_from_adapter, llmm_layers, load_llmm_model,
                  noise_mode, seed_noise)
from llmm.layer import FactorDirections

LEGACY = Path(__file__).parent / "data" / "legacy_adapter"


def legacy_model():
    return load_llmm_model(tiny_llama(), str(LEGACY))


def test_legacy_adapter_loads_with_identical_predictions():
    expected = load_file(LEGACY / "expected.safetensors")
    saved = load_file(LEGACY / "adapter_model.safetensors")
    assert any(key.endswith(".lora_llmm_A") for key in saved)  # the old layout: a bare parameter per factor
    model = legacy_model()
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["mean_logits"], rtol=0, atol=0)
        with noise_mode(model, "sample"):
            seed_noise(model, 5)
            torch.testing.assert_close(model(expected["input_ids"]).logits, expected["sample_logits"], rtol=0, atol=0)
    for key, tensor in saved.items():
        if key.endswith(".lora_llmm_A") or key.endswith(".lora_llmm_B"):
            path = key.removeprefix("base_model.model.") + ".default.weight"
            assert torch.equal(model.base_model.model.get_parameter(path), tensor), key


def test_legacy_adapter_through_peft_load_adapter():
    """A Trainer resume restores the adapter with PEFT's load_adapter: old keys load there too (pre-hook)."""
    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=2, gaussian_embeddings=True,
                                                   target_modules=["q_proj", "v_proj", "embed_tokens"]))
    model.load_adapter(str(LEGACY), "default", is_trainable=True)
    for (name, p), (_, q) in zip(legacy_model().named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), name


def test_new_layout_round_trip_and_resume_start(tmp_path):
    model = legacy_model()
    model.save_pretrained(tmp_path / "new")
    saved = load_file(tmp_path / "new" / "adapter_model.safetensors")
    assert any(key.endswith(".lora_llmm_A.weight") for key in saved)
    assert not any(key.endswith((".lora_llmm_A", ".lora_llmm_B")) for key in saved)
    again = load_llmm_model(tiny_llama(), str(tmp_path / "new"), is_trainable=True)
    for (name, p), (other, q) in zip(model.named_parameters(), again.named_parameters()):
        assert name == other and torch.equal(p, q), name
    # A Trainer resume restores the adapter through PEFT's own load_adapter: the new keys round-trip there too.
    fresh = load_llmm_model(tiny_llama(), str(tmp_path / "new"), is_trainable=True)
    with torch.no_grad():
        for layer in llmm_layers(fresh):
            layer.lora_llmm_A["default"].weight.zero_()
    fresh.load_adapter(str(tmp_path / "new"), "default", is_trainable=True)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name


def test_legacy_init_directory_and_mean_adapter_in_plain_peft(tmp_path):
    config = LlmmConfig(r=4, lora_alpha=8, k=2, target_modules=["q_proj", "v_proj"])
    init = get_llmm_model(tiny_llama(), config)
    state = {key.removesuffix(".weight") if ".lora_llmm_" in key else key: value
             for key, value in load_file_state(init, tmp_path / "init").items()}
    save_file(state, tmp_path / "init" / "adapter_model.safetensors")  # the old layout of an _init.sh directory
    started = init_from_adapter(tiny_llama(), str(tmp_path / "init"), config)
    assert all(not layer.lora_llmm_A["default"].weight.any() for layer in llmm_layers(started))
    model = legacy_model()
    export_mean_adapter(model, str(tmp_path / "mean"))
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mean")).eval()
    inputs = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs).logits, model(inputs).logits, rtol=0, atol=0)


def load_file_state(model, directory):
    model.save_pretrained(directory)
    return load_file(directory / "adapter_model.safetensors")


def test_fsdp_wrap_policy_wraps_every_direction_module():
    """PEFT's FSDP1 policy wraps leaf modules with a trainable .weight: each factor's directions get their own unit,
    apart from the frozen base weights (no "uniform requires_grad" flat parameter)."""
    model = load_llmm_model(tiny_llama(), str(LEGACY), is_trainable=True)
    policy = fsdp_auto_wrap_policy(model)
    directions = [m for m in model.modules() if isinstance(m, FactorDirections)]
    assert len(directions) == 2 * len(llmm_layers(model)) == 10
    assert all(policy(module=m, recurse=False, nonwrapped_numel=0) for m in directions)
    wrapped_params = {id(p) for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)
                      and not list(m.children()) for p in m.parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(id(p) in wrapped_params for n, p in model.named_parameters() if "lora_llmm_" in n)
    assert any("lora_llmm_" in n for n in trainable)
