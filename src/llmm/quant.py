"""Quantizers (normal-float blockwise, uniform) and LoftQ initialization; fake-quant on any device.

- ``fake_quantize(w, bits, method="nf")``: blockwise absmax normal-float. At 4 bits the code book, the scaling
  (x * (1 / absmax)) and the rounding (nearest code, via the midpoints) are bitsandbytes' NF4, so the result
  equals ``dequantize_4bit(quantize_4bit(w, blocksize=64, quant_type="nf4"))`` element for element. At 2 and 8
  bits the code book is LoftQ's asymmetric normal map (2^bits values).
- ``method="uniform"``: clip to mean +- 2 std of the tensor, then 2^bits evenly spaced levels (LoftQ's GLUE).
- ``loftq_init(w, bits, rank)``: T alternating steps Q <- quant(W - B A); (B, A) <- best rank-r fit of W - Q.

Both are vectorised (torch.bucketize over sorted code midpoints): memory is O(weight), never weight x levels.
"""

from __future__ import annotations

from functools import cache

import torch
from scipy.stats import norm

ALLOWED_BITS = (2, 4, 8)
ALLOWED_METHODS = ("nf", "uniform")
NF_OFFSET = 0.9677083  # bitsandbytes' and LoftQ's normal-map offset


def check_quant_args(bits: int, method: str, block_size: int = 64) -> None:
    """Raise a ValueError naming the bad value and what is allowed."""
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if method not in ALLOWED_METHODS:
        raise ValueError(f"quantization method must be one of {ALLOWED_METHODS}, got {method!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


@cache
def normal_float_code(bits: int) -> torch.Tensor:
    """The sorted NF code book in [-1, 1] (float32, CPU): bitsandbytes' NF4 table at 4 bits."""
    if bits == 4:
        from bitsandbytes.functional import get_4bit_type

        return get_4bit_type("nf4", device="cpu").float().sort().values
    levels = 2**bits
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, levels // 2 + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF_OFFSET, 0.5, levels // 2)[:-1].numpy())).tolist()
    code = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return code / code.max()


def _normal_float(weight: torch.Tensor, bits: int, block_size: int, absmax_dtype: torch.dtype | None):
    code = normal_float_code(bits).to(weight.device)
    midpoints = (code[:-1] + code[1:]) / 2
    flat = weight.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    if absmax_dtype is not None:
        # Round the block scale to the storage dtype, so that a 16-bit copy of Q re-quantizes losslessly.
        absmax = absmax.to(absmax_dtype).float()
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    dequantized = code[torch.bucketize(scaled, midpoints)] * absmax
    return dequantized.view(-1)[: flat.numel()].view(weight.shape)


def _uniform(weight: torch.Tensor, bits: int):
    w = weight.float()
    mean, std = w.mean(), w.std()
    low, high = mean - 2 * std, mean + 2 * std
    step = (high - low) / (2**bits - 1)
    if step == 0:
        return w.clone()
    levels = torch.round((w.clamp(low, high) - low) / step)
    return low + levels * step


@torch.no_grad()
def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    method: str = "nf",
    block_size: int = 64,
    absmax_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``weight``; returns float32 values on the quantization grid, same shape."""
    check_quant_args(bits, method, block_size)
    if method == "nf":
        return _normal_float(weight, bits, block_size, absmax_dtype)
    return _uniform(weight, bits)


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    bits: int,
    rank: int,
    num_iter: int = 5,
    method: str = "nf",
    block_size: int = 64,
    absmax_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: returns ``(q_weight, lora_A, lora_B)`` (float32) with W ~ Q + B @ A.

    Each step: Q <- fake_quantize(W - B A); then B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T from the SVD of W - Q.
    """
    check_quant_args(bits, method, block_size)
    if weight.dim() != 2:
        raise ValueError(f"loftq_init needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"LoRA rank must be in [1, {min(weight.shape)}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {rank}")
    if num_iter < 1:
        raise ValueError(f"loftq iterations must be >= 1, got {num_iter}")
    w = weight.float()
    low_rank = torch.zeros_like(w)
    for _ in range(num_iter):
        q_weight = fake_quantize(w - low_rank, bits, method, block_size, absmax_dtype)
        u, s, vh = torch.linalg.svd(w - q_weight, full_matrices=False)
        root = s[:rank].sqrt()
        lora_B = u[:, :rank] * root
        lora_A = root[:, None] * vh[:rank]
        low_rank = lora_B @ lora_A
    return q_weight, lora_A.contiguous(), lora_B.contiguous()
