"""The Llmm layer: Gaussian, K-direction LoRA factors as a PEFT LoRA variant. The method's math lives here.

One adapted linear layer has a frozen (possibly quantized) weight W_q, LoRA factors A (r x d_in), B (d_out x r)
and scaling g = lora_alpha / r. Each factor F in {A, B} is an independent Gaussian with mean M_F (stored in
PEFT's ``lora_A`` / ``lora_B`` weights, so the mean adapter *is* an ordinary LoRA adapter) and K directions
Z_F (K x F.shape, stored in ``lora_llmm_A`` / ``lora_llmm_B``). With a fixed scalar s > 0 (``scale``)::

    eps ~ N(0, I_K)                                   one draw per factor, per layer, per forward call
    F~  = M_F + sum_k (eps_k / sqrt(s)) Z_F[k]        so vec(F~) ~ N(vec(M_F), Z_F^T Z_F / s)
    y   = W_q x + g * B~ (A~ dropout(x))

Training minimises E_eps[loss(F~)] with one sample per forward. The scaled gradient (the paper's update rule,
``scaled_gradient=True``) is dM = dL/dF~ and dZ[k] = eps_k dL/dF~, i.e. sqrt(s) times the plain pathwise
gradient; ``scaled_gradient=False`` gives the plain pathwise gradient eps_k / sqrt(s) dL/dF~.

In eval mode the layer uses the mean (eps = 0) when ``eval_noise="mean"``; ``"sample"`` keeps sampling, as the
reference did. Because eps_A and eps_B are independent with zero mean, E[B~ A~] = M_B M_A: merging writes
W_q + g M_B M_A, which is exactly PEFT's LoRA merge of the means.

The noise eps comes from the model's own ``NoiseSource`` (one torch.Generator per device), never from torch's
global generator: a K > 0 run then consumes exactly the global random numbers a K = 0 run does, so runs of
different methods with the same seed share data order and dropout masks (common random numbers).
"""

from __future__ import annotations

import math
import zlib

import bitsandbytes as bnb
import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from llmm.quant import loftq_init


class _SampleFactor(torch.autograd.Function):
    """F~ = M + (eps / sqrt(s)) . Z with the paper's scaled-gradient backward (or the plain pathwise one)."""

    @staticmethod
    def forward(ctx, mean, directions, eps, scale, scaled_gradient):
        noise_weights = eps / math.sqrt(scale)
        ctx.save_for_backward(eps if scaled_gradient else noise_weights)
        return mean + torch.tensordot(noise_weights.to(directions.dtype), directions, dims=1)

    @staticmethod
    def backward(ctx, grad_sample):
        (weights,) = ctx.saved_tensors
        grad_directions = None
        if ctx.needs_input_grad[1]:
            grad_directions = weights.to(grad_sample.dtype).view(-1, *[1] * grad_sample.dim()) * grad_sample
        return grad_sample, grad_directions, None, None, None


def sample_factor(
    mean: torch.Tensor, directions: torch.Tensor, eps: torch.Tensor, scale: float, scaled_gradient: bool = True
) -> torch.Tensor:
    """One Gaussian factor sample F~ = M + sum_k eps_k / sqrt(scale) * directions[k].

    Backward: dM = g and dZ[k] = eps_k * g (``scaled_gradient=True``) or eps_k * g / sqrt(scale) (plain pathwise).
    ``directions`` has shape (K, *mean.shape) and ``eps`` shape (K,); no gradient flows to ``eps``.
    """
    if directions.shape[1:] != mean.shape or eps.shape != directions.shape[:1]:
        raise ValueError(
            f"sample_factor needs directions of shape (K, *mean.shape) and eps of shape (K,); got mean "
            f"{tuple(mean.shape)}, directions {tuple(directions.shape)}, eps {tuple(eps.shape)}"
        )
    if scale <= 0:
        raise ValueError(f"scale must be > 0 (noise std is 1/sqrt(scale)), got {scale}")
    return _SampleFactor.apply(mean, directions, eps.detach(), float(scale), bool(scaled_gradient))


BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


class NoiseSource:
    """The Llmm noise of one model: a torch.Generator per device, seeded from (seed, process index, device).

    Every Llmm layer of the model points to it (``layer.llmm_noise``); ``llmm.seed_noise(model, seed)`` re-seeds
    it and ``state_dict`` / ``load_state_dict`` carry it through checkpoints. A forward pre-hook on the wrapped
    backbone calls ``new_forward`` at every model forward (so at every decoded token in generation); a layer draws
    its eps (2 x K: A and B) at its first call within a model forward and reuses it if called again within the same
    forward. That reuse is what keeps gradient checkpointing exact: checkpointing re-runs the layers in backward
    and restores only torch's own RNG states, not this generator, so the re-run finds the eps of its forward.
    (Hence, with gradient checkpointing, backward a forward before the model's next forward, as every training
    loop does.) Drawing is a device kernel: no host synchronisation.
    """

    def __init__(self, seed: int, process_index: int = 0):
        self.forward_id = 0
        self.seed(seed, process_index)

    def seed(self, seed: int, process_index: int = 0) -> None:
        """Restart every device's stream from (seed, process_index)."""
        for name, value in (("seed", seed), ("process_index", process_index)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"noise {name} must be an integer >= 0, got {value!r}")
        self.entropy = (seed, process_index)
        self.generators: dict[str, torch.Generator] = {}
        self.forward_id += 1  # draws cached before the re-seed are not reused

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            words = np.random.SeedSequence([*self.entropy, zlib.crc32(key.encode())]).generate_state(2, np.uint32)
            seed = int(words[0]) << 32 | int(words[1])
            self.generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[key]

    def new_forward(self, *_) -> None:
        """A model forward begins: the layers draw fresh eps (signature of a forward pre-hook)."""
        self.forward_id += 1

    def eps(self, layer: nn.Module, adapter_name: str, k: int, device: torch.device) -> torch.Tensor:
        """(2, K) standard normal draws for ``layer``'s factors A and B in the current model forward."""
        cache = layer.__dict__.setdefault("_llmm_eps", {})
        cached = cache.get(adapter_name)
        if cached is not None and cached[0] == self.forward_id and cached[1].device == device:
            return cached[1]
        eps = torch.randn(2, k, device=device, dtype=torch.float32, generator=self.generator(device))
        cache[adapter_name] = (self.forward_id, eps)
        return eps

    def state_dict(self) -> dict:
        return {"entropy": list(self.entropy),
                "generators": {key: g.get_state() for key, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed(*state["entropy"])
        for key, generator_state in state["generators"].items():
            self.generator(torch.device(key)).set_state(generator_state)


class LlmmVariant(LoraVariant):
    """PEFT LoRA variant: adds the K directions per factor and samples the factors in forward."""

    direction_names = ("lora_llmm_A", "lora_llmm_B")

    def supports_lora_conversion(self) -> bool:
        return True  # the mean adapter is a plain LoRA adapter

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, config=None, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError("LlmmConfig does not support lora_bias=True: the Gaussian factors have no bias term")
        if not hasattr(module, "lora_llmm_A"):
            module.adapter_layer_names = module.adapter_layer_names[:] + LlmmVariant.direction_names
            module.lora_llmm_A = nn.ParameterDict()
            module.lora_llmm_B = nn.ParameterDict()
            module.llmm_settings = {}
        weight_A = module.lora_A[adapter_name].weight
        weight_B = module.lora_B[adapter_name].weight
        # Z = 0: step 0 equals plain LoRA / LoftQ; Z grows from its first (scaled) gradient.
        module.lora_llmm_A[adapter_name] = nn.Parameter(weight_A.new_zeros(config.k, *weight_A.shape))
        module.lora_llmm_B[adapter_name] = nn.Parameter(weight_B.new_zeros(config.k, *weight_B.shape))
        module.llmm_settings[adapter_name] = {
            "k": config.k,
            "scale": config.scale,
            "eval_noise": config.eval_noise,
            "scaled_gradient": config.scaled_gradient,
        }

    @staticmethod
    def factors(module: LoraLinear, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A~, B~) this forward uses: a fresh sample in train mode or with eval_noise="sample", else the means."""
        settings = module.llmm_settings[adapter_name]
        mean_A = module.lora_A[adapter_name].weight
        mean_B = module.lora_B[adapter_name].weight
        if not (module.training or settings["eval_noise"] == "sample"):
            return mean_A, mean_B
        # K = 0 goes through the same path (the sum is empty), so every trainable parameter takes part in the
        # graph, as DDP requires.
        directions_A = module.lora_llmm_A[adapter_name]
        directions_B = module.lora_llmm_B[adapter_name]
        noise = module.__dict__.get("llmm_noise")
        if noise is None:
            raise RuntimeError("this Llmm layer has no noise generator: build the model with llmm.get_llmm_model / "
                               "llmm.load_llmm_model, or give it one with llmm.seed_noise(model, seed)")
        eps = noise.eps(module, adapter_name, settings["k"], mean_A.device)
        scale, scaled = settings["scale"], settings["scaled_gradient"]
        return (
            sample_factor(mean_A, directions_A, eps[0], scale, scaled),
            sample_factor(mean_B, directions_B, eps[1], scale, scaled),
        )

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        factor_A, factor_B = LlmmVariant.factors(module, active_adapter)
        dropout = module.lora_dropout[active_adapter]
        update = F.linear(F.linear(dropout(x), factor_A), factor_B) * module.scaling[active_adapter]
        if isinstance(module.get_base_layer(), BNB_LAYERS):
            # PEFT's bitsandbytes LoRA layers add the update in the result's dtype (bfloat16 over an NF4 base with
            # bf16 compute): the same rounding, so the mean adapter gives plain PEFT's logits bit for bit.
            update = update.to(result.dtype)
        return result + update

    # Merging uses the mean: E[B~ A~] = M_B M_A, PEFT's own delta weight of the means.
    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter)
        return orig_weight + delta.to(orig_weight.dtype).to(orig_weight.device)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = module.get_delta_weight(active_adapter)
        return orig_weight - delta.to(orig_weight.dtype).to(orig_weight.device)


class _LlmmLayerMixin:
    """Selects the Llmm variant for every adapter and replaces PEFT's CUDA-only LoftQ init with llmm's."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return LlmmVariant()

    @torch.no_grad()
    def loftq_init(self, adapter_name: str, config) -> None:
        base = self.get_base_layer()
        if type(base) is not nn.Linear:
            raise ValueError(
                f"LoftQ init needs a full-precision nn.Linear base weight, got {type(base).__name__}. Quantize the "
                "model first (bash _init.sh / python -m scripts.quantize_model), then load that backbone in "
                "4-bit and its llmm_init adapter with llmm.load_llmm_model."
            )
        # A 16-bit weight stores Q in 16 bits: a 16-bit absmax makes that copy re-quantize to the same NF4 values.
        absmax_dtype = base.weight.dtype if base.weight.dtype in (torch.bfloat16, torch.float16) else None
        q_weight, factor_A, factor_B = loftq_factors(base.weight, self.r[adapter_name], self.scaling[adapter_name],
                                                     config, absmax_dtype=absmax_dtype)
        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        lora_A.data = factor_A.to(lora_A.dtype).to(lora_A.device)
        lora_B.data = factor_B.to(lora_B.dtype).to(lora_B.device)
        base.weight.data = q_weight.to(base.weight.dtype).to(base.weight.device)


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, scaling: float, config, absmax_dtype=None):
    """LoftQ for one weight as the layer stores it: (Q, M_A, M_B) with W ~ Q + scaling * M_B M_A.

    With ``config.loftq_compensate_scaling`` (default) the 1/scaling is split evenly over both factors; without
    it the factors are written as LoftQ returns them (the reference's behaviour: W ~ Q + B A only at scaling 1).
    """
    loftq = config.loftq_config
    q_weight, factor_A, factor_B = loftq_init(
        weight, bits=loftq["loftq_bits"], rank=rank, num_iter=loftq["loftq_iter"], method=config.loftq_method,
        block_size=config.loftq_block_size, absmax_dtype=absmax_dtype, svd=config.loftq_svd,
        svd_oversampling=config.loftq_svd_oversampling, svd_iters=config.loftq_svd_iters,
    )
    if config.loftq_compensate_scaling:
        root = math.sqrt(scaling)
        factor_A, factor_B = factor_A / root, factor_B / root
    return q_weight, factor_A, factor_B


class LlmmLinear(_LlmmLayerMixin, LoraLinear):
    """Llmm adapter over a torch.nn.Linear base."""


class LlmmLinear4bit(_LlmmLayerMixin, peft_bnb.Linear4bit):
    """Llmm adapter over a bitsandbytes Linear4bit (NF4/FP4) base."""


class LlmmLinear8bitLt(_LlmmLayerMixin, peft_bnb.Linear8bitLt):
    """Llmm adapter over a bitsandbytes Linear8bitLt base."""


# Base layer type -> Llmm layer, registered on LlmmConfig through PEFT's custom-module seam. bitsandbytes layers
# subclass nn.Linear, so they come first (PEFT takes the first isinstance match).
CUSTOM_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    bnb.nn.Linear4bit: LlmmLinear4bit,
    bnb.nn.Linear8bitLt: LlmmLinear8bitLt,
    nn.Linear: LlmmLinear,
}
