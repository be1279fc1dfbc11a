"""Save / load round trips, mean-adapter export to plain PEFT, bitsandbytes 4-bit bases, learning, bad input."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import LLAMA_TARGETS, tiny_deberta, tiny_llama
from peft import (LoftQConfig, LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict,
                  set_peft_model_state_dict)
from safetensors.torch import load_file
from test_layer import randomize
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from llmm import (LlmmConfig, export_mean_adapter, get_llmm_model, llmm_layers, load_llmm_model, noise_mode,
                  save_llmm_adapter, seed_noise)

CONFIG = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)


def trained_adapter(tmp_path, k=2):
    model = get_llmm_model(tiny_llama(), LlmmConfig(k=k, **CONFIG))
    randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_round_trip_restores_means_and_directions_exactly(tmp_path):
    model, adapter_dir = trained_adapter(tmp_path)
    loaded = load_llmm_model(tiny_llama(), str(adapter_dir))
    original = dict(model.named_parameters())
    restored = dict(loaded.named_parameters())
    names = [n for n in original if "lora_" in n]
    assert any("lora_llmm_" in n for n in names)
    for name in names:
        assert torch.equal(original[name], restored[name]), name
    inputs = torch.randint(0, 128, (2, 9))
    model.eval()
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    with noise_mode(model, "sample"), noise_mode(loaded, "sample"):
        seed_noise(model, 5), seed_noise(loaded, 5)
        expected = model(inputs).logits
        torch.testing.assert_close(loaded(inputs).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_llmm_model(tiny_llama(), str(adapter_dir), is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_a_k0_adapter_saved_without_its_empty_directions_reloads(tmp_path):
    """A sharded run's gather of the trainable tensors leaves out K = 0's zero-size (frozen) directions: the adapter
    reloads all the same, to the same outputs."""
    from safetensors.torch import save_file

    model, adapter_dir = trained_adapter(tmp_path, k=0)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    kept = {key: tensor for key, tensor in tensors.items() if tensor.numel() > 0}
    assert len(kept) < len(tensors)
    save_file(kept, weights)
    loaded = load_llmm_model(tiny_llama(), str(adapter_dir), k=0)
    inputs = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(loaded(inputs).logits, model.eval()(inputs).logits, rtol=0, atol=0)


def test_mismatched_k_is_an_error(tmp_path):
    _, adapter_dir = trained_adapter(tmp_path, k=2)
    with pytest.raises(ValueError, match="K=2 but K=3"):
        load_llmm_model(tiny_llama(), str(adapter_dir), k=3)
    with pytest.raises(TypeError, match="is_trainable must be True or False, got 'yes'"):
        load_llmm_model(tiny_llama(), str(adapter_dir), is_trainable="yes")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["k"] = 3  # the directions on disk still have K = 2
    config_path.write_text(json.dumps(config))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"has K \(2, "):
        load_llmm_model(base, str(adapter_dir))
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # left as it was given


def test_loading_may_change_the_noise_not_the_mean_function(tmp_path):
    """Overrides of a loaded adapter: the noise and dropout fields only (alpha or rslora would change the means'
    scaling); an unknown field of LlmmConfig.from_pretrained is an error, not dropped."""
    _, adapter_dir = trained_adapter(tmp_path)
    loaded = load_llmm_model(tiny_llama(), str(adapter_dir), eval_noise="sample", noise_width=0.5)
    assert loaded.peft_config["default"].noise_width == 0.5
    for name, value in (("lora_alpha", 64), ("use_rslora", True), ("fan_in_fan_out", True), ("r", 8)):
        with pytest.raises(ValueError, match=f"cannot override '{name}'.*allowed: eval_noise, scale"):
            load_llmm_model(tiny_llama(), str(adapter_dir), **{name: value})
    with pytest.raises(ValueError, match="LlmmConfig has no field 'eval_nosie'"):
        LlmmConfig.from_pretrained(str(adapter_dir), eval_nosie="sample")
    with pytest.raises(ValueError, match="scaled_gradient must be true or false"):  # "no" would act as True
        load_llmm_model(tiny_llama(), str(adapter_dir), scaled_gradient="no")
    with pytest.raises(TypeError, match="k must be an int"):
        load_llmm_model(tiny_llama(), str(adapter_dir), k="2")


def test_an_init_adapter_fixes_the_scaling_of_its_means(tmp_path):
    from llmm import init_from_adapter

    init = get_llmm_model(tiny_llama(), LlmmConfig(k=0, use_rslora=True, **CONFIG))
    randomize(init)  # means unlike a fresh init's (B = 0)
    init.save_pretrained(tmp_path / "init")
    model = init_from_adapter(tiny_llama(), str(tmp_path / "init"), LlmmConfig(k=2, use_rslora=True, **CONFIG))
    saved, loaded = load_file(tmp_path / "init" / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    means = [key for key in saved if ".lora_A." in key or ".lora_B." in key]
    assert len(means) == 2 * len(llmm_layers(model)) > 0
    assert all(torch.equal(loaded[key], saved[key]) for key in means)  # the model starts from the saved means
    assert all(value.abs().max() == 0 for key, value in loaded.items() if "lora_llmm_" in key)  # directions: zero
    with pytest.raises(ValueError, match="use_rslora=True but the config has use_rslora=False"):
        init_from_adapter(tiny_llama(), str(tmp_path / "init"), LlmmConfig(k=2, **CONFIG))


def test_in_process_loftq_refuses_an_lm_head_tied_to_the_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    embeddings = tied.get_input_embeddings().weight.clone()
    loftq = dict(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1))
    with pytest.raises(ValueError, match="'lm_head', which shares its weight with the input embeddings"):
        get_llmm_model(tied, LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], **loftq))
    assert torch.equal(tied.get_input_embeddings().weight, embeddings)  # refused before anything was quantized
    with pytest.raises(ValueError, match="'model.embed_tokens', which shares its weight with the LM head"):
        get_llmm_model(tied, LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], **loftq))
    assert torch.equal(tied.get_input_embeddings().weight, embeddings)  # refused before anything was quantized
    get_llmm_model(tied, LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **loftq))  # the head untouched


def test_a_model_of_ones_own_that_returns_logits_and_has_no_embedding_getters(tmp_path):
    """A plain nn.Module (no get_input_embeddings, logits as a bare tensor): Monte-Carlo prediction keeps the batch,
    and both save paths work; an nn.Linear subclass (Falcon's FalconLinear) takes in-process LoftQ."""
    from llmm import mc_predict, save_llmm_adapter

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 32), type("SubLinear", (torch.nn.Linear,), {})(32, 5)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = get_llmm_model(Net(), LlmmConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], k=2,
                                             init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4)))
    x = torch.randn(8, 16)
    probabilities = mc_predict(model, {"x": x}, 3)
    assert probabilities.shape == (8, 5) and not torch.allclose(probabilities[0], probabilities[1])
    codes = model.base_model.model.fc2.get_base_layer().weight.detach().flatten()[:128].view(2, 64)
    assert all(len(block.unique()) <= 16 for block in codes)  # the SubLinear's base was quantized to NF4 in-process
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    export_mean_adapter(model, str(tmp_path / "mean"))
    with torch.no_grad():
        expected = model.eval()(x)
        reloaded = load_llmm_model(copy.deepcopy(model).unload(), str(tmp_path / "adapter")).eval()(x)
        mean = PeftModel.from_pretrained(copy.deepcopy(model).unload(), str(tmp_path / "mean")).eval()(x)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)


def test_a_plain_lora_adapter_beside_an_llmm_one_is_peft_s_own(tmp_path):
    model = get_llmm_model(tiny_llama(), LlmmConfig(k=2, **CONFIG))
    model.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "plain" not in layer.lora_variant and "default" in layer.lora_variant
    randomize(model)  # both adapters' means, and the Llmm one's directions
    reference = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model, adapter_name="plain"))
    model.set_adapter("plain")
    model.train(), reference.train()
    inputs = tiny_llama().dummy_inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, reference(inputs).logits, rtol=0, atol=1e-6)  # no noise


def test_layers_of_an_added_llmm_adapter_join_the_model_s_noise_generator():
    """PEFT's add_adapter adapts new layers without the model's NoiseSource: their forward names seed_noise, which
    gives them the model's (re-seeded, one forward hook), so every layer of one forward draws from one generator."""
    from llmm import noise_source, seed_noise

    model = get_llmm_model(tiny_llama(), LlmmConfig(k=2, **{**CONFIG, "target_modules": ["q_proj"]}))
    source = noise_source(model)
    model.add_adapter("second", LlmmConfig(k=2, **{**CONFIG, "target_modules": ["q_proj", "v_proj"]}))
    model.set_adapter("second")
    randomize(model)
    model.train()
    inputs = tiny_llama().dummy_inputs["input_ids"]
    with pytest.raises(RuntimeError, match="no noise generator.*seed_noise"):
        model(inputs)
    hooks = len(model.get_base_model()._forward_pre_hooks)
    assert seed_noise(model, 3) is source and noise_source(model) is source
    assert len(model.get_base_model()._forward_pre_hooks) == hooks
    first = model(inputs).logits
    seed_noise(model, 3)
    torch.testing.assert_close(model(inputs).logits, first)  # one seeded generator behind every layer
    assert not torch.allclose(model(inputs).logits, first)


def test_mc_predict_names_a_batch_that_is_not_a_mapping():
    from llmm import mc_predict

    model = get_llmm_model(tiny_llama(), LlmmConfig(k=2, **CONFIG))
    with pytest.raises(TypeError, match="batch must be a mapping of the model's inputs.*got Tensor"):
        mc_predict(model, torch.randint(0, 128, (2, 5)), 2)


def test_plain_lora_or_missing_adapter_is_an_error(tmp_path):
    model, adapter_dir = trained_adapter(tmp_path)
    export_mean_adapter(model, str(tmp_path / "mean"))
    with pytest.raises(ValueError, match="plain LoRA adapter"):
        load_llmm_model(tiny_llama(), str(tmp_path / "mean"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llmm_model(tiny_llama(), str(tmp_path / "nowhere"))
    with pytest.raises(FileExistsError, match="not empty"):
        export_mean_adapter(model, str(tmp_path / "mean"))


PLAIN_PEFT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        adapted = model(inputs).logits
        merged = model.merge_and_unload()(inputs).logits
    assert "llmm" not in sys.modules
    torch.save({"adapted": adapted, "merged": merged}, out_path)
""")


def test_export_mean_adapter_loads_in_plain_peft(tmp_path):
    model, _ = trained_adapter(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "base")
    export_mean_adapter(model, str(tmp_path / "mean"))
    assert not any("lora_llmm" in k for k in load_file(tmp_path / "mean" / "adapter_model.safetensors"))
    inputs = torch.randint(0, 128, (2, 10))
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PEFT_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "mean"),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt")
    model.eval()
    with torch.no_grad():
        expected = model(inputs).logits
    torch.testing.assert_close(result["adapted"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["merged"], expected, rtol=1e-5, atol=1e-5)


def load_4bit(path):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu",
                                                dtype=torch.float32)


def test_bitsandbytes_4bit_base_trains_saves_and_reloads(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = get_llmm_model(load_4bit(tmp_path / "base"), LlmmConfig(k=2, **CONFIG))
    assert type(llmm_layers(model)[0]).__name__ == "LlmmLinear4bit"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = torch.randint(0, 128, (4, 12))
    model.train()
    for _ in range(3):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_llmm_" in n)
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    # Loaded for more training: the same (plain) CPU 4-bit path as the trained model, so the same logits exactly.
    # (Loaded for evaluation it keeps bitsandbytes' default kernel, as plain PEFT does: test_llama_scripts.)
    loaded = load_llmm_model(load_4bit(tmp_path / "base"), str(tmp_path / "adapter"), is_trainable=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)


def test_learning_lowers_loss_and_moves_directions():
    torch.manual_seed(0)
    # A frozen random network with weights large enough to matter; the adapters learn to continue a few progressions.
    model = get_llmm_model(tiny_llama(vocab_size=32, initializer_range=0.2), LlmmConfig(k=2, scale=100.0, **CONFIG))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    inputs = (torch.arange(16) * 3 + torch.arange(4)[:, None] * 7) % 32
    model.train()
    losses = []
    for _ in range(40):
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert min(p.abs().max().item() for n, p in model.named_parameters() if "lora_llmm_" in n) > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=-1), r"k \(K\) must be an integer >= 0.*got -1"),
    (dict(scale=0.0), r"scale \(llmmscale\) must be a finite number > 0.*got 0.0"),
    (dict(scale=float("inf")), r"scale \(llmmscale\) must be a finite number > 0.*got inf"),
    (dict(scale="400"), r"scale \(llmmscale\) must be a finite number > 0.*got '400'"),
    (dict(lora_alpha=0), r"lora_alpha \(lora_alpha\) must be a finite number > 0.*got 0"),
    (dict(lora_alpha=float("nan")), r"lora_alpha .* must be a finite number > 0.*got nan"),
    (dict(lora_dropout=1.5), r"lora_dropout .* must be a number in \[0, 1\), got 1.5"),
    (dict(r=0), r"r \(rank\) must be an integer >= 1, got 0"),
    (dict(eval_noise="mc"), "eval_noise must be one of"),
    (dict(loftq_method="int"), "loftq_method must be one of"),
    (dict(scaled_gradient="false"), r"scaled_gradient must be true or false \(a bool\), got 'false'"),
    (dict(loftq_compensate_scaling="no"), r"loftq_compensate_scaling must be true or false"),
    (dict(gaussian_embeddings=1), r"gaussian_embeddings must be true or false"),
    (dict(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=3)), r"loftq_bits must be one of \(2, 4, 8\), got 3"),
    (dict(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=2.0)), r"loftq_bits .*, got 2.0"),
    (dict(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter="5")),
     r"loftq_iter must be an integer >= 1, got '5'"),
    (dict(loftq_block_size=0), r"loftq_block_size must be an integer >= 1, got 0"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern values must be numbers > 0, got \{'q_proj': -1\}"),
    (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern values must be integers > 0"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlmmConfig(**{**CONFIG, **kwargs})


def test_bad_targets():
    with pytest.raises(ValueError, match="larger than target module"):
        get_llmm_model(tiny_llama(), LlmmConfig(r=100, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"target module\(s\) \['all-linear', 'qproj'\] match no module.*only as a "
                       "string"):  # PEFT would adapt q_proj and drop the rest silently
        get_llmm_model(tiny_llama(), LlmmConfig(r=4, target_modules=["q_proj", "qproj", "all-linear"]))
    with pytest.raises(ValueError, match="is a LayerNorm; Llmm adapts only"):
        get_llmm_model(tiny_deberta(), LlmmConfig(r=4, target_modules=["LayerNorm"]))
    with pytest.raises(ValueError, match="adapts only embedding tables, with plain pairs"):  # llmm.embedding
        get_llmm_model(tiny_llama(), LlmmConfig(r=4, target_modules=["embed_tokens"]))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"over \['Conv1D'\]: Llmm adapts torch.nn.Linear"):
        get_llmm_model(gpt2, LlmmConfig(r=4, target_modules="all-linear"))


def test_adapter_writes_are_atomic(tmp_path, monkeypatch):
    from llmm import save_llmm_adapter

    model, _ = trained_adapter(tmp_path)
    target = tmp_path / "final"
    save_llmm_adapter(model, str(target))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(directory, **kwargs):
        (tmp_path / "partial").mkdir(exist_ok=True)
        open(f"{directory}/adapter_model.safetensors", "wb").write(b"half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_llmm_adapter(model, str(target), overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")] == []
    load_llmm_model(tiny_llama(), str(target))


def test_other_lora_variants_are_refused():
    with pytest.raises(ValueError, match="cannot combine with other LoRA variants \\(use_dora\\)"):
        LlmmConfig(use_dora=True, **CONFIG)


def test_an_adapter_of_another_name_saves_at_the_top_and_reloads_exactly(tmp_path):
    """save_llmm_adapter(adapter_name=...) writes that adapter where load_llmm_model reads it; a name the model lacks
    is one error."""
    model = get_llmm_model(tiny_llama(), LlmmConfig(k=2, **CONFIG), adapter_name="mine")
    randomize(model)
    with pytest.raises(ValueError, match=r"the model has no adapter 'default' \(its adapters: \['mine'\]\)"):
        save_llmm_adapter(model, str(tmp_path / "wrong"))
    save_llmm_adapter(model, str(tmp_path / "adapter"), adapter_name="mine")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "adapter" / "mine").exists()
    loaded = load_llmm_model(tiny_llama(), str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 5, 9, 3]])
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
