"""Wrap a model with Llmm adapters, load one back exactly, export the mean adapter, switch the noise mode.

    model = get_llmm_model(base, LlmmConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], k=2))
    model.save_pretrained("out/adapter")                       # M and Z, plus the llmm fields of the config
    model = load_llmm_model(base, "out/adapter")               # every M and Z restored, K checked
    export_mean_adapter(model, "out/mean")                     # a plain PEFT LoRA adapter (A = M_A, B = M_B)
    seed_noise(model, seed=0)                                  # restart the model's own noise generator
    with noise_width(model, 2.0): ...                          # evaluate with the noise m = 2 times as wide
    loss = loss - entropy_weight(step, lam, warmup) * entropy(model)   # the optional entropy term

Adapters saved before the directions became ``FactorDirections`` submodules (keys ``<layer>.lora_llmm_A``, today
``<layer>.lora_llmm_A.weight``) load unchanged (``convert_legacy_directions``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmm.config import EVAL_NOISE_MODES, LlmmConfig
from llmm.embedding import EMBEDDING_MODULES, LlmmEmbedding
from llmm.layer import CUSTOM_MODULES, LlmmVariant, factor_entropy
from llmm.noise import NoiseSource, checked_integer, checked_number
from llmm.outdirs import atomic_dir
from llmm.records import not_a_directory

ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIRECTION_KEYS = LlmmVariant.direction_names


def is_direction_key(key: str) -> bool:
    """A state-dict key of K directions: ``<layer>.lora_llmm_A.weight`` (today) or ``<layer>.lora_llmm_A`` (before)."""
    return any(part in DIRECTION_KEYS for part in key.split(".")[-2:])


def convert_legacy_directions(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy direction keys (``.lora_llmm_A`` -> ``.lora_llmm_A.weight``); other keys pass unchanged."""
    return {f"{key}.weight" if key.endswith(DIRECTION_KEYS) else key: value for key, value in state.items()}


def _check_per_example(model: torch.nn.Module, config: LlmmConfig) -> None:
    """Per-example noise needs every Llmm layer called on the batch; DeBERTa-v3 (share_att_key) also projects the
    relative embeddings, which the batch shares, with its query and key layers (the noise refuses it at the first
    forward; here before anything is wrapped)."""
    model_config = getattr(model, "config", None)
    if not (getattr(config, "noise_per_example", False) and config.k > 0
            and getattr(model_config, "share_att_key", False) and getattr(model_config, "relative_attention", False)):
        return
    if config.target_modules is None:  # PEFT's default targets for the architecture
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model_config, "model_type", None))
        if not targets:
            return
        config = dataclasses.replace(config, target_modules=targets)
    every_linear = config.target_modules == "all-linear"  # PEFT's shorthand: every Linear but the output layer
    shared = [name for name, module in model.named_modules() if name.endswith(("query_proj", "key_proj"))
              and (isinstance(module, torch.nn.Linear) if every_linear else check_target_module_exists(config, name))]
    if shared:
        raise ValueError(f"noise_per_example: {shared[0]} also projects the relative embeddings, which the batch "
                         "shares (share_att_key), so no one example's network applies there: use noise_per_example "
                         "false")


def check_target_names(model: torch.nn.Module, target_modules) -> None:
    """Every name of a target list matches a module of ``model`` (PEFT adapts those that do and drops the rest
    silently); a regex string (or None) is PEFT's to match. ``model`` may be on the meta device."""
    if target_modules is None or isinstance(target_modules, str):
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [key for key in sorted(target_modules) if not any(name == key or name.endswith(f".{key}")
                                                                  for name in names)]
    if unmatched:
        shorthand = " ('all-linear' is PEFT's shorthand only as a string, not in a list)" \
            if "all-linear" in unmatched else ""
        raise ValueError(f"target module(s) {unmatched} match no module of the model: fix the name(s) in "
                         f"target_modules (a module's last name, e.g. q_proj){shorthand}")


def _check_targets(model: torch.nn.Module, config: LlmmConfig) -> None:
    if config.target_modules is None:
        return  # PEFT picks the architecture's defaults; llmm_layers() checks the result after wrapping
    check_target_names(model, config.target_modules)
    allowed = (*CUSTOM_MODULES, *EMBEDDING_MODULES)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {head: "input embeddings", embeddings: "LM head"} if head is not None and embeddings is not None \
        and head.weight is embeddings.weight else {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if module in tied and config.init_lora_weights == "loftq":
            raise ValueError(f"in-process LoftQ over {name!r}, which shares its weight with the {tied[module]}, "
                             f"would quantize the {tied[module]} too: drop {name} from target_modules, or start from "
                             "LoRA's init (init_lora_weights=True; the scripts' --init lora)")
        if not isinstance(module, allowed):
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; Llmm adapts only "
                             f"{', '.join(cls.__module__ + '.' + cls.__name__ for cls in allowed)}: drop it from "
                             "target_modules")
        width = (min(module.weight.shape) if isinstance(module, torch.nn.Embedding)
                 else min(module.in_features, module.out_features))
        rank = config.rank_pattern.get(name.split(".")[-1], config.r) if config.rank_pattern else config.r
        if rank > width:
            raise ValueError(f"LoRA rank {rank} is larger than target module {name!r} allows "
                             f"(min(in, out) = {width}); use r <= {width}")


def llmm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The adapted layers with Gaussian factors; raises if any other adapted layer is not an Llmm layer (no silent
    plain-LoRA fallback). The one exception: plain pairs on embedding tables (``gaussian_embeddings=False``, the
    reference's GLUE protocol), which are not returned."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    plain = [type(m.get_base_layer()).__name__ for m in layers
             if not hasattr(m, "llmm_settings") and not isinstance(m, LlmmEmbedding)]
    if plain:
        raise ValueError(f"adapted layers without Llmm factors, over {sorted(set(plain))}: Llmm adapts torch.nn.Linear "
                         "(bitsandbytes' 4/8-bit too) and embedding tables; name only such modules in target_modules")
    return [module for module in layers if hasattr(module, "llmm_settings")]


def keep_cpu_4bit_trainable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' CPU Linear4bit layers trainable after an evaluation (for training only).

    bitsandbytes 0.50 repacks a CPU Linear4bit for inference at its first no-grad forward in eval mode; its packed
    gemv has no autograd kernel, so backward then silently zeroes the gradient of every adapter below that layer.
    Models loaded for evaluation keep bitsandbytes' default, as plain PEFT and lm-eval do."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                raise RuntimeError("this bitsandbytes version has no Linear4bit.support_avx512bf16_for_cpu: check "
                                   "that CPU 4-bit training still gets gradients, then update keep_cpu_4bit_trainable")
            module.support_avx512bf16_for_cpu = False


def noise_source(model: torch.nn.Module) -> NoiseSource:
    """The ``NoiseSource`` the model's Llmm layers draw their noise from."""
    sources = {id(layer.__dict__.get("llmm_noise")): layer.__dict__.get("llmm_noise") for layer in llmm_layers(model)}
    if len(sources) != 1 or None in sources.values():
        raise ValueError("the model's Llmm layers do not share one noise generator: call llmm.seed_noise(model, seed)")
    return next(iter(sources.values()))


def seed_noise(model: torch.nn.Module, seed: int | None = None, process_index: int = 0) -> NoiseSource:
    """Seed the model's Llmm noise generator with (``seed``, ``process_index``), creating it if the model has none;
    layers that have none (adapted by PEFT's ``add_adapter`` since) join the model's.

    Seeding torch does not seed it, but ``get_llmm_model`` / ``load_llmm_model`` seed a new model's generator from
    ``torch.initial_seed()`` (also ``seed=None``), so a script that seeds torch first is repeatable as it is."""
    seed = torch.initial_seed() if seed is None else seed
    layers = llmm_layers(model)
    if not layers:
        raise ValueError("seed_noise needs a model with Llmm layers (llmm.get_llmm_model / llmm.load_llmm_model)")
    current = {id(s): s for s in (layer.__dict__.get("llmm_noise") for layer in layers) if s is not None}
    if len(current) == 1:
        source = next(iter(current.values()))
        source.seed(seed, process_index)
    else:
        source = NoiseSource(seed, process_index)
        root = model.get_base_model() if isinstance(model, PeftModel) else model
        root.register_forward_pre_hook(source.new_forward)  # every model forward (every decoded token) draws anew
    for layer in layers:
        layer.llmm_noise = source
    return source


def get_llmm_model(model: torch.nn.Module, config: LlmmConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with Llmm adapters (in place, like peft.get_peft_model); LoftQ runs here if requested."""
    if not isinstance(config, LlmmConfig):
        raise TypeError(f"get_llmm_model needs an LlmmConfig, got {type(config).__name__}")
    _check_targets(model, config)
    _check_per_example(model, config)
    keep_cpu_4bit_trainable(model)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if not llmm_layers(peft_model):
        if any(isinstance(m, LlmmEmbedding) for m in peft_model.modules()):
            raise ValueError(f"target_modules={config.target_modules!r} adapts only embedding tables, with plain "
                             "pairs: add linear layers, or set gaussian_embeddings=True")
        raise ValueError(f"no module matched target_modules={config.target_modules!r}")
    seed_noise(peft_model)
    return peft_model


def _load_adapter_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir!r}: pass a directory written by save_pretrained")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path!r} is truncated or corrupt ({error}): save the adapter again or restore the "
                         "file") from None


# What a loaded adapter may change: the noise and the dropout, never the trained model's mean function.
LOAD_OVERRIDES = ("eval_noise", "scale", "scaled_gradient", "lora_dropout", "noise_per_example", "noise_width")


def load_llmm_model(base_model: torch.nn.Module, adapter_dir: str, is_trainable: bool = False, k: int | None = None,
                    **overrides) -> PeftModel:
    """Load an Llmm adapter onto ``base_model``, restoring every M and Z exactly. ``k``: the K expected, if given;
    ``overrides``: config fields that do not change shapes."""
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"adapter directory {adapter_dir!r} {not_a_directory(adapter_dir)}")
    config = LlmmConfig.from_pretrained(adapter_dir)
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable must be True or False, got {is_trainable!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise TypeError(f"k must be an int (the K the adapter must have), got {k!r}")
    if k is not None and k != config.k:
        raise ValueError(f"the adapter in {adapter_dir!r} has K={config.k} but K={k} was asked for: "
                         f"set K={config.k} or train a new adapter")
    for name, value in overrides.items():
        if name not in LOAD_OVERRIDES:  # the rest fix the shapes or the trained model's function
            raise ValueError(f"cannot override {name!r} when loading an adapter; allowed: {', '.join(LOAD_OVERRIDES)}")
        setattr(config, name, value)
    config = dataclasses.replace(config, init_lora_weights=False, loftq_config={}, inference_mode=not is_trainable)
    saved = convert_legacy_directions(_load_adapter_weights(adapter_dir))
    _check_per_example(base_model, config)
    if is_trainable:
        keep_cpu_4bit_trainable(base_model)
    model = get_peft_model(base_model, config)
    try:
        _check_saved_adapter(model, saved, adapter_dir, config)
    except ValueError:
        model.unload()  # the base model back as it was given
        raise
    set_peft_model_state_dict(model, saved)
    seed_noise(model)
    if not is_trainable:
        model.eval()
    return model


def _check_saved_adapter(model: PeftModel, saved: dict, adapter_dir: str, config: LlmmConfig) -> None:
    """The saved tensors are the wrapped model's adapter, key for key and shape for shape; an empty one (K = 0's
    directions, which a sharded gather of frozen tensors leaves out) is added to ``saved`` if missing."""
    llmm_layers(model)
    expected = get_peft_model_state_dict(model, save_embedding_layers=False)
    for key, tensor in expected.items():
        if key not in saved and tensor.numel() == 0:
            saved[key] = torch.empty(tensor.shape, dtype=tensor.dtype)
    # Adapters saved with PEFT's default also hold the frozen embedding / LM-head base weights: accepted, not needed.
    allowed = get_peft_model_state_dict(model, save_embedding_layers=True)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(allowed))
    if missing or unexpected:
        raise ValueError(f"adapter {adapter_dir!r} does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]} (different targets, K or architecture?): load it onto the "
                         "backbone it was trained on")
    for key, tensor in allowed.items():
        if key in saved and saved[key].shape != tensor.shape:
            what = "K" if is_direction_key(key) and saved[key].shape[1:] == tensor.shape[1:] else "shape"
            raise ValueError(f"adapter {adapter_dir!r}: {key} has {what} {tuple(saved[key].shape)}, the model "
                             f"expects {tuple(tensor.shape)} (config K={config.k}, r={config.r}): load it onto the "
                             "backbone it was trained on")


def init_from_adapter(model: torch.nn.Module, init_dir: str, config: LlmmConfig) -> PeftModel:
    """Wrap ``model`` with ``config`` and start from the LoftQ means of an init adapter (``_init.sh``'s llmm_init/),
    whose scaling fields (r, lora_alpha, use_rslora, rank / alpha patterns) must be ``config``'s and directions
    zero: any K starts from exactly the same model."""
    saved = LlmmConfig.from_pretrained(init_dir)
    for name in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(f"{init_dir!r} holds LoftQ means for {name}={getattr(saved, name)!r} but the config has "
                             f"{name}={getattr(config, name)!r}: use an _init.sh directory made with the same {name}, "
                             "as its scaling compensates the means")
    weights = convert_legacy_directions(_load_adapter_weights(init_dir))
    if any(t.numel() and t.abs().max() > 0 for key, t in weights.items() if is_direction_key(key)):
        raise ValueError(f"{init_dir!r} has non-zero directions (a trained adapter, not an init): load it with "
                         "load_llmm_model instead")
    config = dataclasses.replace(config, init_lora_weights=False, loftq_config={}, inference_mode=False)
    peft_model = get_llmm_model(model, config)
    state = get_peft_model_state_dict(peft_model)
    means, saved_means = {key for key in state if _is_mean(key)}, {key for key in weights if _is_mean(key)}
    if means != saved_means:
        raise ValueError(f"{init_dir!r} does not match this model's target modules: missing "
                         f"{sorted(means - saved_means)[:3]}, unexpected {sorted(saved_means - means)[:3]}")
    set_peft_model_state_dict(peft_model, {**state, **{key: weights[key] for key in means}})
    return peft_model


def _is_mean(key: str) -> bool:
    parts = key.split(".")
    return parts[-2] in ("lora_A", "lora_B") or parts[-1] in ("lora_embedding_A", "lora_embedding_B")


def frozen_embedding_bases(peft_model: PeftModel) -> list[str] | None:
    """State-dict keys of the base weights of adapted input-embedding / LM-head layers if all are frozen, else None.

    PEFT's ``save_embedding_layers="auto"`` saves them with every adapter (GBs for a 7B LM head); frozen, they equal
    the backbone's, so a saved adapter leaves them out. A vocabulary resized before adapting is not detected: save
    such a model with ``save_pretrained(save_embedding_layers=True)``."""
    getters = (getattr(peft_model, name, None) for name in ("get_input_embeddings", "get_output_embeddings"))
    tables = {id(t) for t in (get() for get in getters if get) if isinstance(t, BaseTunerLayer)}  # any nn.Module
    layers = {name: module for name, module in peft_model.named_modules() if id(module) in tables}
    if any(module.get_base_layer().weight.requires_grad for module in layers.values()):
        return None
    return [f"{name}.base_layer.weight" for name in layers]


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrapped_name(name: str) -> str:
    """A module or state-dict name without the segments wrappers add (FSDP1, activation checkpointing, compile)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def adapter_state_dict(peft_model: PeftModel, state_dict=None, adapter_name="default") -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict`` of one adapter (without frozen embedding bases, _embedding_option) for a
    model whose modules may sit inside wrappers, keyed unwrapped. PEFT 0.21 strips only a leading
    ``_fsdp_wrapped_module.``, so under nested FSDP1 units it selects nothing."""
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r} (its adapters: {sorted(peft_model.peft_config)}): "
                         "pass one of those as adapter_name")
    state = peft_model.state_dict() if state_dict is None else state_dict
    state = {unwrapped_name(key): value for key, value in state.items()}
    seen = {unwrapped_name(name): name.removeprefix("_fsdp_wrapped_module.") for name, _ in peft_model.named_modules()}
    wrapped = {clean: name for clean, name in seen.items() if clean != name}
    if wrapped:
        state = {_wrapped_key(key, wrapped): value for key, value in state.items()}
    selected = get_peft_model_state_dict(peft_model, state_dict=state, adapter_name=adapter_name,
                                         **_embedding_option(peft_model))
    return {unwrapped_name(key): value for key, value in selected.items()}


def _wrapped_key(key: str, wrapped: dict[str, str]) -> str:
    """``key`` with its longest module prefix found in ``wrapped`` replaced by PEFT's name."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        if module in wrapped:
            return ".".join([wrapped[module], *parts[end:]])
    return key


def _saveable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage with another (safetensors refuses aliases)."""
    out, storages = {}, set()
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        storage = (value.untyped_storage().data_ptr(), value.device.type)
        out[key] = value.clone() if storage in storages and value.numel() else value
        storages.add(storage)
    return out


def nonempty(selected: dict[str, torch.Tensor], state_dict) -> dict[str, torch.Tensor]:
    """``selected``, or a ValueError if it is empty: an adapter file without tensors loads as an untrained one."""
    if not selected:
        where = ("the model's state dict" if state_dict is None
                 else f"the {len(state_dict)} given state-dict keys {list(state_dict)[:2]}")
        raise ValueError(f"the adapter to save would be empty: no tensor of {where} belongs to its layers; "
                         "nothing was written")
    return selected


def _embedding_option(peft_model: PeftModel) -> dict:
    return {"save_embedding_layers": False} if frozen_embedding_bases(peft_model) else {}


def adapter_weights(peft_model: PeftModel, state_dict=None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors ``save_llmm_adapter`` writes, ready for safetensors."""
    return _saveable(nonempty(adapter_state_dict(peft_model, state_dict, adapter_name), state_dict))


def save_llmm_adapter(peft_model: PeftModel, out_dir: str, overwrite: bool = False, state_dict=None,
                      adapter_name: str = "default") -> str:
    """``peft_model.save_pretrained(out_dir)`` of one adapter without frozen embedding / LM-head base weights,
    atomically, at the top of ``out_dir`` whatever its name (as load_llmm_model reads it). ``state_dict``: tensors to
    take instead of the model's own (a sharded model's: ``gathered_state_dict``)."""
    weights = adapter_weights(peft_model, state_dict, adapter_name)
    with atomic_dir(out_dir, overwrite) as tmp_dir:
        # PEFT writes the config and model card; its weights file, empty under nested FSDP1 units, is replaced.
        peft_model.save_pretrained(tmp_dir, state_dict=state_dict, selected_adapters=[adapter_name],
                                   **_embedding_option(peft_model))
        if adapter_name != "default":  # PEFT puts another adapter in a sub-folder of its name
            for path in list(Path(tmp_dir, adapter_name).iterdir()):
                path.replace(Path(tmp_dir, path.name))
            Path(tmp_dir, adapter_name).rmdir()
        save_file(weights, os.path.join(tmp_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def export_mean_adapter(peft_model: PeftModel, out_dir: str, adapter_name: str = "default", overwrite: bool = False,
                        state_dict=None) -> str:
    """Write the mean adapter (A = M_A, B = M_B) as a plain PEFT LoRA adapter, atomically; returns ``out_dir``."""
    state = adapter_state_dict(peft_model, state_dict, adapter_name)
    state = _saveable(nonempty({key: value for key, value in state.items() if not is_direction_key(key)}, state_dict))
    config = peft_model.peft_config[adapter_name]
    plain = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig)
             if f.init and f.name != "runtime_config"}
    lora_config = LoraConfig(**{**plain, "init_lora_weights": True, "loftq_config": {}, "inference_mode": True})
    with atomic_dir(out_dir, overwrite) as tmp_dir:
        lora_config.save_pretrained(tmp_dir)
        save_file(state, os.path.join(tmp_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


@contextlib.contextmanager
def _setting(model: torch.nn.Module, key: str, value):
    """Temporarily set ``llmm_settings[adapter][key]`` of every Llmm layer and adapter to ``value``."""
    settings = [s for layer in llmm_layers(model) for s in layer.llmm_settings.values()]
    previous = [s[key] for s in settings]
    for s in settings:
        s[key] = value
    try:
        yield
    finally:
        for s, before in zip(settings, previous):
            s[key] = before


@contextlib.contextmanager
def noise_mode(model: torch.nn.Module, mode: str):
    """Temporarily set every Llmm layer's eval-mode noise to ``"mean"`` or ``"sample"``."""
    if mode not in EVAL_NOISE_MODES:
        raise ValueError(f"noise mode must be one of {EVAL_NOISE_MODES}, got {mode!r}")
    with _setting(model, "eval_noise", mode):
        yield model


@contextlib.contextmanager
def noise_width(model: torch.nn.Module, multiplier: float):
    """Temporarily draw every Llmm factor's noise ``multiplier`` times as wide: F~ = M + m sum_k eps_k Z[k] / sqrt(s)
    (m = 1 the paper, m = 0 the mean network), wherever the layers sample."""
    with _setting(model, "width", checked_number(multiplier, "the noise width multiplier")):
        yield model


def entropy(model: torch.nn.Module, floor: float = 1e-6) -> torch.Tensor:
    """The optional entropy term, sum over layers, adapters and factors of ``factor_entropy``: the training loss is
    ``loss - lambda * entropy(model)``. A differentiable float32 scalar on the directions' device; under the scaled
    gradient rule its gradient w.r.t. Z carries the rule's sqrt(s), as the loss's does."""
    checked_number(floor, "the entropy floor", positive=True)
    terms = [factor_entropy(directions, settings["scale"], floor, settings["scaled_gradient"])
             for layer in llmm_layers(model) for name, settings in layer.llmm_settings.items()
             for directions in LlmmVariant.directions(layer, name) if directions.shape[0] > 0]
    if not terms:
        return torch.zeros(())
    return torch.stack([term.to(terms[0].device) for term in terms]).sum()


def entropy_weight(step: int, weight: float, warmup_steps: int) -> float:
    """lambda at optimizer step ``step``: linear warm-up from 0 to ``weight`` over ``warmup_steps`` (0: no warm-up),
    as BLoB schedules its KL weight."""
    weight = checked_number(weight, "the entropy weight")
    checked_integer(step, "entropy_weight's step", 0)
    checked_integer(warmup_steps, "entropy_weight's warmup_steps", 0)
    return weight if warmup_steps == 0 else weight * min(1.0, step / warmup_steps)
