"""Sharded training of Llmm models (FSDP1, FSDP2, DeepSpeed ZeRO-3 through accelerate): what the engines need.

    policy = fsdp1_wrap_policy(model)           # FSDP1: each Llmm layer one unit (M and Z), its base layer another
    shard_fsdp2(model)                          # FSDP2 by hand (a loop of one's own): decoder layers, then the root
    state = gathered_state_dict(model)          # every process calls it; the main process gets whole tensors
    if main_process: save_llmm_adapter(peft_model, "out/adapter", state_dict=state)
    check_sharded_launch(accelerator_state)     # accelerate asked for FSDP / DeepSpeed and will really use it

Why an own FSDP1 policy: an FSDP1 unit is gathered only while its own forward runs, and its flat parameter needs
uniform requires_grad (peft#1702). Wrapping each whole Llmm layer (all its own parameters trainable, gathered for
its forward) and its frozen base layer as two units satisfies both, where PEFT's policy wraps ``lora_A`` /
``lora_B`` alone. FSDP2 shards per parameter, so decoder-layer units work as they are (torch 2.13)."""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch import nn

SHARDING_ENV = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes the model names in ``_no_split_modules`` (its transformer blocks), found among its modules."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    return {type(module) for module in model.modules() if type(module).__name__ in names}


def fsdp1_wrap_policy(model: nn.Module):
    """An FSDP1 ``auto_wrap_policy``: the decoder layers, and inside them each Llmm layer and its base layer
    (``use_orig_params=False`` works, as FSDP-QLoRA needs)."""
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    units = {id(unit) for module in model.modules() if hasattr(module, "llmm_settings")  # each Llmm layer, its base
             for unit in (module, module.get_base_layer())}
    if not units:
        raise ValueError("fsdp1_wrap_policy needs a model with Llmm layers (llmm.get_llmm_model / load_llmm_model)")
    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in units),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(model))])


def shard_fsdp2(model: nn.Module, **kwargs) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (what accelerate's FSDP2 does with TRANSFORMER_BASED_WRAP);
    ``kwargs`` go to every ``fully_shard`` call (e.g. ``reshard_after_forward``, ``offload_policy``)."""
    from torch.distributed.fsdp import fully_shard

    classes = decoder_layer_classes(model)
    if not classes:
        raise ValueError("shard_fsdp2 found no decoder layers (no _no_split_modules on the model)")
    for module in list(model.modules()):
        if type(module) in classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (not sharded) trainable tensors on CPU, keyed as the unwrapped model's state dict. Every process
    calls it; on an accelerator the main process gets them and the others an empty dict, on CPU every process
    (FSDP1's CPU offload of CPU tensors frees them before they are read, torch 2.13)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_accelerator = any(parameter.device.type != "cpu" for parameter in model.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_accelerator, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def requested_engine() -> str:
    """What the launch asks for ("FSDP", "DEEPSPEED" or "none"), from the variables ``accelerate launch`` sets
    (usable before any process group exists)."""
    return next((engine for variable, engine in SHARDING_ENV.items() if os.environ.get(variable, "").lower() == "true"),
                "none")


def check_sharded_launch(state=None) -> str:
    """What the launch shards with ("FSDP", "DEEPSPEED" or "none"); a ValueError when accelerate was asked for
    FSDP / DeepSpeed and would not use it: accelerate 1.15 turns FSDP on only for accelerator backends, so a CPU
    launch silently runs plain DDP. ``state``: the run's ``AcceleratorState``, or None: judged from
    ``PartialState().device``, before the Trainer exists."""
    engine = requested_engine()
    if engine == "none":
        return "none"
    if engine == "FSDP" and os.environ.get("FSDP_VERSION", "1") == "1" and os.environ.get(
            "FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        raise ValueError(f"FSDP1 with fsdp_state_dict_type {os.environ['FSDP_STATE_DICT_TYPE']}: PEFT selects no "
                         "adapter tensor from its sharded checkpoint parts, so a resume would start from the untrained "
                         "adapter; set fsdp_state_dict_type: FULL_STATE_DICT (configs/accelerate/fsdp1.yaml), or use "
                         "FSDP2")
    if engine == "DEEPSPEED":
        try:
            importlib.import_module("deepspeed")
        except ImportError as error:
            raise ValueError("the accelerate config asks for DeepSpeed, which is not installed: pip install "
                             "deepspeed (CUDA machines), or launch with configs/accelerate/fsdp2.yaml") from error
    if state is None:
        from accelerate import PartialState
        state = PartialState()
        usable = state.device.type != "cpu"
    else:
        usable = str(state.distributed_type).rsplit(".", 1)[-1] == engine
    if not usable:
        used = str(getattr(state, "distributed_type", "no")).rsplit(".", 1)[-1]
        raise ValueError(f"the accelerate config asks for {engine} but accelerate runs {used} distribution on "
                         f"{getattr(state, 'device', 'this device')} (accelerate shards only on GPUs and other "
                         "accelerators): launch on GPUs, or drop --config_file for DDP on CPU")
    return engine


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 (DTensor) tensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
