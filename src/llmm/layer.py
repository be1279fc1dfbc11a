"""The Llmm layer: Gaussian, K-direction LoRA factors as a PEFT LoRA variant. The method's math lives here.

A layer has a frozen (possibly quantized) weight W_q, LoRA factors A (r x d_in), B (d_out x r) and scaling
g = lora_alpha / r. Each factor F in {A, B} is a Gaussian with mean M_F (PEFT's ``lora_A`` / ``lora_B``: the mean
adapter is an ordinary LoRA adapter) and K directions Z_F (K x F.shape, ``lora_llmm_A`` / ``lora_llmm_B``, leaf
modules with a ``.weight`` so that FSDP shards them with the means). With a fixed scalar s > 0 (``scale``)::

    eps ~ N(0, I_K)                                   one draw per factor, per layer, per forward call
    F~  = M_F + sum_k (eps_k / sqrt(s)) Z_F[k]        so vec(F~) ~ N(vec(M_F), Z_F^T Z_F / s)
    y   = W_q x + g * B~ (A~ dropout(x))

The scaled gradient (the paper's rule, ``scaled_gradient=True``) is dM = dL/dF~ and dZ[k] = eps_k dL/dF~, sqrt(s)
times the plain pathwise gradient (``scaled_gradient=False``). In eval mode ``eval_noise="mean"`` uses eps = 0
(``"sample"`` keeps sampling, as the reference did); as E[B~ A~] = M_B M_A, merging is PEFT's LoRA merge of the
means. eps comes from the model's ``NoiseSource`` (``llmm.noise``), never from torch's global generator.

Options beyond the paper (each off by default, the paper bit for bit):

- ``noise_per_example``: one eps per example b, so dZ[k] = sum_b eps_bk dL_b/dF~_b; computed as K + 1 LoRA paths
  (``rowwise_sample_path``), not one adapter per example.
- ``noise_width`` m: F~ = M + m sum_k eps_k Z[k] / sqrt(s) (m = 0: the mean network), chosen on validation data
  (``llmm.width.choose_noise_width``).
- The entropy term (``factor_entropy``, ``llmm.entropy``): the loss becomes loss - lambda * H with H = sum over layers
  and factors of 0.5 logdet(Z Z^T / s + floor I), which rewards large, linearly independent directions."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from peft.tuners.lora import bnb as peft_bnb
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from llmm.quant import loftq_init

try:  # modules FSDP manages: FSDP1 wrappers (PEFT's wrap policy) and FSDP2 (fully_shard) modules
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    SHARDED_MODULES: tuple[type, ...] = (FullyShardedDataParallel, FSDPModule)
except ImportError:  # a torch built without distributed support
    SHARDED_MODULES = ()


class _SampleFactor(torch.autograd.Function):
    """F~ = M + (eps / sqrt(s)) . Z; eps (G, K) gives G samples, summed elementwise so that a sample's bits do not
    depend on G."""

    @staticmethod
    def forward(ctx, mean, directions, eps, scale, scaled_gradient):
        noise_weights = eps / math.sqrt(scale)  # scale inf (noise width 0): the mean, whose dZ is 0 under either rule
        ctx.save_for_backward(eps if scaled_gradient and math.isfinite(scale) else noise_weights)
        if eps.dim() == 1:
            return mean + torch.tensordot(noise_weights.to(directions.dtype), directions, dims=1)
        weights = noise_weights.to(directions.dtype).view(*eps.shape, *[1] * mean.dim())
        return mean + (weights * directions).sum(1)

    @staticmethod
    def backward(ctx, grad_sample):
        (weights,) = ctx.saved_tensors
        grad_directions = None
        if weights.dim() == 2:  # G samples: dM = sum_g g_g, dZ[k] = sum_g w_gk g_g
            if ctx.needs_input_grad[1]:
                grad_directions = torch.tensordot(weights.T.to(grad_sample.dtype), grad_sample, dims=1)
            return grad_sample.sum(0), grad_directions, None, None, None
        if ctx.needs_input_grad[1]:
            grad_directions = weights.to(grad_sample.dtype).view(-1, *[1] * grad_sample.dim()) * grad_sample
        return grad_sample, grad_directions, None, None, None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant (the scaled-gradient rule, row-wise path)."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def sample_factor(mean: torch.Tensor, directions, eps: torch.Tensor, scale: float,
                  scaled_gradient: bool = True) -> torch.Tensor:
    """F~ = M + sum_k eps_k / sqrt(scale) * directions[k]: directions (K, *mean.shape) (or their ``FactorDirections``),
    eps (K,), or (G, K) for G samples (G, *mean.shape). Backward: dZ[k] = eps_k g, or eps_k g / sqrt(scale)."""
    directions = directions.weight if isinstance(directions, FactorDirections) else directions
    if directions.shape[1:] != mean.shape or eps.shape[-1:] != directions.shape[:1] or eps.dim() > 2:
        raise ValueError(f"sample_factor needs directions of shape (K, *mean.shape) and eps of shape (K,) or (G, K); "
                         f"got mean {tuple(mean.shape)}, directions {tuple(directions.shape)}, eps {tuple(eps.shape)}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0 (noise std is 1/sqrt(scale)), got {scale}")
    return _SampleFactor.apply(mean, directions, eps.detach(), float(scale), bool(scaled_gradient))


def effective_scale(settings: dict) -> float:
    """The s of the noise drawn: s / m^2 for the noise-width multiplier m (m = 1: s bit for bit; m = 0: inf)."""
    width = settings.get("width", 1.0)
    return settings["scale"] if width == 1.0 else (settings["scale"] / width**2 if width > 0 else math.inf)


def rowwise_sample_path(project, x: torch.Tensor, mean_A, mean_B, directions_A, directions_B, eps: torch.Tensor,
                        scale: float, scaled_gradient: bool) -> torch.Tensor:
    """B~_b (A~_b x_b) for every row b with its own eps[:, b] (eps (2, rows, K)), as K + 1 LoRA paths mixed per row.

    ``project(x, W)`` is the layer's first step. With w = eps / sqrt(s): h_b = M_A x_b + sum_k w_A[b,k] Z_A[k] x_b,
    out_b = M_B h_b + sum_k w_B[b,k] Z_B[k] h_b; the scaled rule multiplies autograd's gradient of Z by sqrt(s)."""
    k, rank, d_out = directions_A.shape[0], mean_A.shape[0], mean_B.shape[0]
    if scaled_gradient and math.isfinite(scale):
        directions_A = _ScaleGradient.apply(directions_A, math.sqrt(scale))
        directions_B = _ScaleGradient.apply(directions_B, math.sqrt(scale))
    weights = (eps / math.sqrt(scale)).to(directions_A.dtype)  # (2, rows, K)
    hidden = project(x, torch.cat([mean_A, directions_A.reshape(k * rank, *mean_A.shape[1:])]))  # (rows, .., (K+1) r)
    shape = (x.shape[0], *[1] * (hidden.dim() - 2), k, 1)
    hidden = hidden[..., :rank] + (hidden[..., rank:].unflatten(-1, (k, rank)) * weights[0].view(shape)).sum(-2)
    out = F.linear(hidden, torch.cat([mean_B, directions_B.reshape(k * d_out, rank)]))
    return out[..., :d_out] + (out[..., d_out:].unflatten(-1, (k, d_out)) * weights[1].view(shape)).sum(-2)


def grouped_sample_path(project_groups, x: torch.Tensor, factors_A: torch.Tensor, factors_B: torch.Tensor):
    """B~_g (A~_g x) for G groups of consecutive rows (Monte-Carlo network g on batch copy g), factors_A (G, r, d_in)
    and factors_B (G, d_out, r): the FLOPs of one LoRA path."""
    groups = factors_A.shape[0]
    hidden = project_groups(x.unflatten(0, (groups, x.shape[0] // groups)), factors_A)  # (G, rows / G, ..., r)
    out = hidden.flatten(1, -2) @ factors_B.transpose(-1, -2)
    return out.reshape(x.shape[0], *hidden.shape[2:-1], -1)  # (rows, ..., d_out)


class FactorDirections(nn.Module):
    """The K directions Z of one factor as a leaf module's ``.weight`` (K, *factor shape), so that FSDP shards them
    as PEFT does DoRA's magnitude. A module FSDP wraps on its own holds its full weight only within its forward: the
    layer then calls it (a copy of Z; the gradient flows back through FSDP's hooks)."""

    def __init__(self, directions: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(directions)

    def forward(self) -> torch.Tensor:
        return self.weight.clone()

    def extra_repr(self) -> str:
        return f"K={self.weight.shape[0]}, factor={tuple(self.weight.shape[1:])}"


class LlmmVariant(LoraVariant):
    """PEFT LoRA variant: adds the K directions per factor and samples the factors in forward.

    The embedding variant (``llmm.embedding``) overrides the five layout hooks. A forward's path goes by its eps:
    (2, K) one (A~, B~) for the batch (``lora_path``, the paper); (2, rows, K) per example (``rowwise_sample_path``);
    (2, N, K) one pair per batch copy of N Monte-Carlo networks (``grouped_sample_path``)."""

    direction_names = ("lora_llmm_A", "lora_llmm_B")

    def supports_lora_conversion(self) -> bool:
        return True  # the mean adapter is a plain LoRA adapter

    # ---------------------------------------------------------------------------------------- layout hooks
    @staticmethod
    def means(module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_A (r x d_in), M_B (d_out x r)); read through a call where FSDP wraps the LoRA linears (DoRA's way)."""
        lora_A, lora_B = module.lora_A[adapter_name], module.lora_B[adapter_name]
        if isinstance(lora_A, SHARDED_MODULES) or isinstance(lora_B, SHARDED_MODULES):
            return _weight_by_call(lora_A), _weight_by_call(lora_B)
        return lora_A.weight, lora_B.weight

    @staticmethod
    def project(module, adapter_name: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(module.lora_dropout[adapter_name](x), weight)

    @staticmethod
    def project_groups(module, adapter_name: str, x: torch.Tensor, factors_A: torch.Tensor) -> torch.Tensor:
        hidden = module.lora_dropout[adapter_name](x)
        return (hidden.flatten(1, -2) @ factors_A.transpose(-1, -2)).reshape(*x.shape[:-1], -1)

    @staticmethod
    def lora_path(module, adapter_name: str, x: torch.Tensor, factor_A, factor_B) -> torch.Tensor:
        update = F.linear(F.linear(module.lora_dropout[adapter_name](x), factor_A), factor_B)
        return update * module.scaling[adapter_name]

    @staticmethod
    def finish(module, adapter_name: str, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if isinstance(module.get_base_layer(), BNB_LAYERS):
            # PEFT's bitsandbytes LoRA layers add the update in the result's dtype (bfloat16 over an NF4 base with
            # bf16 compute): the same rounding, so the mean adapter gives plain PEFT's logits bit for bit.
            update = update.to(result.dtype)
        return result + update

    # ---------------------------------------------------------------------------------------- the method
    @classmethod
    def init(cls, module, adapter_name: str, config=None, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError("LlmmConfig does not support lora_bias=True: the Gaussian factors have no bias term")
        if not hasattr(module, "lora_llmm_A"):
            module.adapter_layer_names = module.adapter_layer_names[:] + cls.direction_names
            module.lora_llmm_A, module.lora_llmm_B = nn.ModuleDict(), nn.ModuleDict()
            module.llmm_settings = {}
            module.register_load_state_dict_pre_hook(_legacy_direction_keys)
        mean_A, mean_B = cls.means(module, adapter_name)
        # Z = 0: step 0 equals plain LoRA / LoftQ; Z grows from its first (scaled) gradient.
        module.lora_llmm_A[adapter_name] = FactorDirections(mean_A.new_zeros(config.k, *mean_A.shape))
        module.lora_llmm_B[adapter_name] = FactorDirections(mean_B.new_zeros(config.k, *mean_B.shape))
        module.llmm_settings[adapter_name] = {
            "k": config.k, "scale": config.scale, "eval_noise": config.eval_noise,
            "scaled_gradient": config.scaled_gradient, "per_example": getattr(config, "noise_per_example", False),
            "width": getattr(config, "noise_width", 1.0)}

    @staticmethod
    def directions(module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Z_A, Z_B), each (K, *factor shape)."""
        holders = module.lora_llmm_A[adapter_name], module.lora_llmm_B[adapter_name]
        return tuple(holder() if isinstance(holder, SHARDED_MODULES) else holder.weight for holder in holders)

    @staticmethod
    def sampling(module, adapter_name: str) -> bool:
        return module.training or module.llmm_settings[adapter_name]["eval_noise"] == "sample"

    @staticmethod
    def draw(module, adapter_name: str, rows: int, device: torch.device, per_example: bool | None = None):
        """This forward's eps: (2, K) shared by the batch, or (2, rows, K) per example / per Monte-Carlo network."""
        noise = module.__dict__.get("llmm_noise")
        if noise is None:
            raise RuntimeError("this Llmm layer has no noise generator: build the model with llmm.get_llmm_model / "
                               "llmm.load_llmm_model, or give it one with llmm.seed_noise(model, seed)")
        settings = module.llmm_settings[adapter_name]
        per_example = settings["per_example"] if per_example is None else per_example
        return noise.eps(module, adapter_name, settings["k"], device, rows, per_example)

    @classmethod
    def factors(cls, module, adapter_name: str, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A~, B~) this forward uses (the means unless sampling; eps (2, G, K) gives G pairs). K = 0 takes the
        same path (an empty sum), so every trainable parameter is in the graph, as DDP requires."""
        mean_A, mean_B = cls.means(module, adapter_name)
        if not cls.sampling(module, adapter_name):
            return mean_A, mean_B
        settings = module.llmm_settings[adapter_name]
        if eps is None:  # a caller outside forward (a table read whole): one draw shared by the batch
            noise = module.__dict__.get("llmm_noise")
            if noise is not None and noise.streams is not None and len(noise.streams) > 1:
                raise ValueError("batched Monte-Carlo networks need every Llmm layer to be called on the batch, but "
                                 "this one is read whole (e.g. DeBERTa's relative-position table): use batched=False")
            eps = cls.draw(module, adapter_name, 1, mean_A.device, per_example=False)
            eps = eps[:, 0] if eps.dim() == 3 else eps  # one Monte-Carlo network: its (2, 1, K) draw
        directions_A, directions_B = cls.directions(module, adapter_name)
        scale, scaled = effective_scale(settings), settings["scaled_gradient"]
        return (sample_factor(mean_A, directions_A, eps[0], scale, scaled),
                sample_factor(mean_B, directions_B, eps[1], scale, scaled))

    @classmethod
    def forward(cls, module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
        eps = None
        if cls.sampling(module, active_adapter):
            eps = cls.draw(module, active_adapter, x.shape[0], x.device)
        settings = module.llmm_settings[active_adapter]
        if eps is None or eps.dim() == 2:
            update = cls.lora_path(module, active_adapter, x, *cls.factors(module, active_adapter, eps))
        elif not settings["per_example"]:  # Monte-Carlo networks: one (A~, B~) per batch copy
            update = grouped_sample_path(
                lambda inputs, factors: cls.project_groups(module, active_adapter, inputs, factors), x,
                *cls.factors(module, active_adapter, eps)) * module.scaling[active_adapter]
        else:
            update = rowwise_sample_path(
                lambda inputs, weight: cls.project(module, active_adapter, inputs, weight), x,
                *cls.means(module, active_adapter), *cls.directions(module, active_adapter), eps,
                effective_scale(settings), settings["scaled_gradient"]) * module.scaling[active_adapter]
        return cls.finish(module, active_adapter, result, update)

    # Merging uses the mean: E[B~ A~] = M_B M_A, PEFT's own delta weight of the means.
    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype).to(orig_weight.device)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype).to(orig_weight.device)


def _legacy_direction_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: direction keys saved before ``FactorDirections`` load into ``...<adapter>.weight``.
    The old key is ``<layer>.lora_llmm_A.<adapter>``, or ``<layer>.lora_llmm_A`` as PEFT passes a key it does not
    know: that one goes to the adapter whose means the same state dict loads."""
    means = ("lora_A.{}.weight", "lora_embedding_A.{}")
    loading = [adapter for adapter in getattr(module, "llmm_settings", {})
               if any(prefix + key.format(adapter) in state_dict for key in means)]
    for name in LlmmVariant.direction_names:
        for adapter in getattr(module, name, {}):
            for old in (f"{prefix}{name}.{adapter}", *([f"{prefix}{name}"] if loading == [adapter] else [])):
                if old in state_dict and f"{prefix}{name}.{adapter}.weight" not in state_dict:
                    state_dict[f"{prefix}{name}.{adapter}.weight"] = state_dict.pop(old)


def _weight_by_call(linear: nn.Module) -> torch.Tensor:
    """W of a linear layer (out x in) that FSDP wraps on its own, through its forward: (I W^T)^T = W, bit for bit."""
    eye = torch.eye(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
    return linear(eye).T


def factor_entropy(directions: torch.Tensor, scale: float, floor: float, scaled_gradient: bool = False) -> torch.Tensor:
    """0.5 logdet(Z Z^T / s + floor I): one factor's Gaussian entropy within the span of its K directions, up to a
    constant (Z Z^T the K x K Gram matrix); finite at Z = 0. ``scaled_gradient``: its gradient w.r.t. Z is sqrt(s)
    times the true one, as the data term's is under the paper's rule, so the update is sqrt(s) times the gradient of
    loss - lambda H and lambda weighs the same under either rule."""
    if scaled_gradient:
        directions = _ScaleGradient.apply(directions, math.sqrt(scale))
    flat = directions.reshape(directions.shape[0], -1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # float32 at least (bf16 directions)
    gram = flat @ flat.T / scale + floor * torch.eye(flat.shape[0], device=flat.device, dtype=flat.dtype)
    return 0.5 * torch.linalg.slogdet(gram)[1]


BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


class _LlmmLayerMixin:
    """Selects the Llmm variant for every adapter and replaces PEFT's CUDA-only LoftQ init with llmm's."""

    def resolve_lora_variant(self, *, config, **kwargs):
        """The Llmm variant for an LlmmConfig adapter; a plain LoraConfig one (PEFT's add_adapter / load_adapter of a
        LoRA adapter beside it) is PEFT's own."""
        if not hasattr(config, "k"):
            return super().resolve_lora_variant(config=config, **kwargs)
        return LlmmVariant()

    @torch.no_grad()
    def loftq_init(self, adapter_name: str, config) -> None:
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) or isinstance(base, BNB_LAYERS):  # subclasses too (Falcon's FalconLinear)
            raise ValueError(f"LoftQ init needs a full-precision nn.Linear base weight, got {type(base).__name__}. "
                             "Quantize the model first (bash _init.sh / python -m scripts.quantize_model), then load "
                             "that backbone in 4-bit and its llmm_init adapter with llmm.load_llmm_model.")
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
    """LoftQ for one weight: (Q, M_A, M_B) with W ~ Q + scaling * M_B M_A; 1/scaling is split over both factors
    unless ``config.loftq_compensate_scaling`` is off (the reference: W ~ Q + B A only at scaling 1)."""
    loftq = config.loftq_config
    q_weight, factor_A, factor_B = loftq_init(
        weight, bits=loftq["loftq_bits"], rank=rank, num_iter=loftq["loftq_iter"], method=config.loftq_method,
        block_size=config.loftq_block_size, absmax_dtype=absmax_dtype, svd=config.loftq_svd,
        svd_oversampling=config.loftq_svd_oversampling, svd_iters=config.loftq_svd_iters)
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
    bnb.nn.Linear4bit: LlmmLinear4bit, bnb.nn.Linear8bitLt: LlmmLinear8bitLt, nn.Linear: LlmmLinear}
