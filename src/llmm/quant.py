"""Quantizers (normal-float blockwise, uniform) and LoftQ initialization; fake-quant on any device.

- ``fake_quantize(w, bits, method="nf")``: blockwise absmax normal-float. At 4 bits the code book, the scaling
  (x * (1 / absmax)) and the rounding (nearest code, via the midpoints) are bitsandbytes' NF4, so the result
  equals ``dequantize_4bit(quantize_4bit(w, blocksize=64, quant_type="nf4"))`` element for element. At 2 and 8
  bits the code book is LoftQ's asymmetric normal map (2^bits values).
- ``method="uniform"``: clip to mean +- 2 std of the tensor, then 2^bits evenly spaced levels from the min to the
  max of the clipped tensor (LoftQ's GLUE quantizer, its formula exactly).
- ``loftq_init(w, bits, rank)``: T alternating steps Q <- quant(W - B A); (B, A) <- best rank-r fit of W - Q, by
  the exact SVD or by ``truncated_svd`` (randomized block Krylov, warm-started from the previous step).

All of it is vectorised and stays on the weight's device (no host sync); memory is a few times the weight."""

from __future__ import annotations

import sys
from functools import cache

import numpy as np
import torch
from bitsandbytes.functional import get_4bit_type
from scipy.stats import norm

ALLOWED_BITS = (2, 4, 8)
ALLOWED_METHODS = ("nf", "uniform")
ALLOWED_SVD = ("exact", "truncated")
NF_OFFSET = 0.9677083  # bitsandbytes' and LoftQ's normal-map offset


def check_quant_args(bits: int, method: str, block_size: int = 64) -> None:
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
        return get_4bit_type("nf4", device="cpu").float().sort().values
    levels = 2**bits
    positive = norm.ppf(torch.linspace(NF_OFFSET, 0.5, levels // 2 + 1)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF_OFFSET, 0.5, levels // 2)[:-1].numpy())).tolist()
    code = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return code / code.max()


@cache
def _rounding_tables(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code lookup keyed by a float32's top 16 bits (65536 cells, each an interval of floats).

    The nearest code of x is code[number of midpoints < x] (bitsandbytes' rounding, a tie going down); a cell holds
    at most one midpoint (checked). Returns ``threshold`` (the cell's midpoint, else +inf) and ``values`` (the
    cell's code below it, then above), so that code(x) = values[cell + 65536 * (x > threshold[cell])], exactly."""
    if sys.byteorder != "little":
        raise RuntimeError("the normal-float lookup reads a float's high half as the second 16-bit word")
    code = normal_float_code(bits).double()
    midpoints = ((normal_float_code(bits)[:-1] + normal_float_code(bits)[1:]) / 2).double()
    cells = np.arange(2**16, dtype=np.uint32) << 16
    first, last = cells.view(np.float32), (cells | 0xFFFF).view(np.float32)
    with np.errstate(invalid="ignore"):
        low, high = torch.from_numpy(np.fmin(first, last)).double(), torch.from_numpy(np.fmax(first, last)).double()
    finite = torch.isfinite(low) & torch.isfinite(high)
    below = torch.searchsorted(midpoints, low)  # midpoints < every x of the cell
    upto = torch.searchsorted(midpoints, high, right=True)  # midpoints <= the cell's largest x
    positive = torch.from_numpy((first >= 0) | np.isnan(first))  # infinities and NaNs: the extreme codes
    below = torch.where(finite, below, torch.where(positive, len(midpoints), 0))
    inside = torch.where(finite, upto - below, 0)
    if int(inside.max()) > 1:
        raise RuntimeError(f"two {bits}-bit code midpoints share a 16-bit cell; the lookup needs a finer key")
    threshold = torch.where(inside == 1, midpoints[below.clamp(max=len(midpoints) - 1)], torch.inf).float()
    values = torch.cat([code[below], code[(below + inside).clamp(max=len(code) - 1)]]).float()
    return threshold.to(device), values.to(device)


def _normal_float_scratch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, device = weight.numel(), weight.device
    return (torch.empty(size, dtype=torch.int32, device=device), torch.empty(size, device=device),
            torch.empty(size, dtype=torch.bool, device=device))


def _normal_float(weight: torch.Tensor, bits: int, block_size: int, absmax_dtype: torch.dtype | None,
                  out: torch.Tensor | None = None, scratch: tuple[torch.Tensor, ...] | None = None):
    """Blockwise NF fake-quantization into ``out`` (float32, not ``weight``) with the temporaries in ``scratch``, so
    that LoftQ's loop allocates nothing per call (on a CPU a fresh weight-sized tensor costs about a pass over it)."""
    threshold, values = _rounding_tables(bits, weight.device)
    flat = weight.reshape(-1).float()
    pad = (-flat.numel()) % block_size
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)
    low, high = torch.aminmax(blocks, dim=1, keepdim=True)
    absmax = torch.maximum(high, -low)  # = blocks.abs().amax(1), without a weight-sized temporary
    if absmax_dtype is not None:
        # Round the block scale to the storage dtype, so that a 16-bit copy of Q re-quantizes losslessly.
        absmax = absmax.to(absmax_dtype).float()
    inverse = 1.0 / absmax.clamp(min=1e-38)  # bitsandbytes' scaling, x * (1 / absmax), bit for bit
    reuse = not pad  # the buffers are weight-sized: a padded weight (numel not a multiple of the block) allocates
    scaled = (torch.mul(blocks, inverse, out=out.view(-1, block_size)) if out is not None and reuse
              else blocks * inverse).view(-1)
    cell_buffer, threshold_buffer, above_buffer = scratch if scratch is not None and reuse else (None, None, None)
    # Nearest code by table lookup: a few memory-bound passes (torch.bucketize was 4x slower on a CPU thread); no
    # clamp needed, as every float has a cell and |x| > 1 rounds to the extreme code.
    high_half = scaled.view(torch.uint16)[1::2]  # the float's high half (little-endian)
    cell = high_half.to(torch.int32) if cell_buffer is None else cell_buffer.copy_(high_half)
    above = torch.gt(scaled, torch.index_select(threshold, 0, cell, out=threshold_buffer), out=above_buffer)
    key = cell.add_(above, alpha=threshold.numel())
    dequantized = torch.index_select(values, 0, key, out=scaled).view_as(blocks).mul_(absmax)  # scaled is spent
    result = dequantized.view(-1)[: flat.numel()].view(weight.shape)
    return out.copy_(result) if out is not None and pad else result


def _uniform(weight: torch.Tensor, bits: int):
    # The reference's formula (LoftQ's glue/utils_qaunt.py): clip to mean +- 2 std, then 2^bits levels spread
    # over [min, max] of the *clipped* tensor (narrower than the clip range when a tail does not reach its bound),
    # with its 1e-8 guard, so a constant tensor comes back unchanged. No host sync: no branch on a tensor value.
    w = weight.float()
    mean, std = w.mean(), w.std()
    clipped = torch.maximum(torch.minimum(w, mean + 2 * std), mean - 2 * std)
    low = clipped.min()
    span = clipped.max() - low + 1e-8
    steps = 2**bits - 1
    return torch.round((clipped - low) / span * steps).div(steps) * span + low


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int, method: str = "nf", block_size: int = 64,
                  absmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize then dequantize ``weight``; returns float32 values on the quantization grid, same shape."""
    check_quant_args(bits, method, block_size)
    if method == "nf":
        return _normal_float(weight, bits, block_size, absmax_dtype)
    return _uniform(weight, bits)


def check_svd_args(svd: str, oversampling: int, iterations: int) -> None:
    if svd not in ALLOWED_SVD:
        raise ValueError(f"loftq_svd must be one of {ALLOWED_SVD}, got {svd!r}")
    for name, value in (("loftq_svd_oversampling", oversampling), ("loftq_svd_iters", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def truncated_svd(matrix: torch.Tensor, rank: int, oversampling: int, iterations: int,
                  start: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``matrix`` (m x n) by a randomized block Krylov method.

    A block of l = rank + oversampling columns (``start``, n x l: a warm start, else Gaussian) spans Y_0 = M start;
    each power step adds Y_i = (M M^T) Y_{i-1}, orthogonalised against the earlier blocks. Keeping every block is
    what makes this accurate on the nearly flat spectra of quantization residuals (Musco & Musco, NeurIPS 2015).
    The exact SVD of the small projection K^T M (K the basis of all blocks) gives the triplets (Rayleigh-Ritz);
    where K would span min(m, n) columns, the full SVD is used. Returns ``(U_r, S_r, Vh_r, right_basis)``, the
    top-l right singular vectors (n x l) to warm-start the next call."""
    rows, cols = matrix.shape
    width = rank + oversampling
    if width * (iterations + 1) >= min(rows, cols):
        u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], singular[:rank], vh[:rank], vh[:width].T
    if start is None:
        start = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    blocks = [torch.linalg.qr(matrix @ start).Q]
    projections = []  # B_i^T M for every block: the rows of K^T M, each computed once
    for _ in range(iterations):
        projections.append(blocks[-1].T @ matrix)
        block = matrix @ projections[-1].T  # M (B^T M)^T = M M^T B, without a strided pass over M
        earlier = torch.cat(blocks, dim=1)
        for _ in range(2):  # block Gram-Schmidt, twice ("twice is enough")
            block = block - earlier @ (earlier.T @ block)
        block = torch.linalg.qr(block).Q
        # Once more against the earlier blocks, then QR: where the block lost rank, QR's filler columns are
        # orthonormal among themselves but not to the earlier blocks; K must be orthonormal for K^T M = C.
        block = torch.linalg.qr(block - earlier @ (earlier.T @ block)).Q
        blocks.append(block)
    projections.append(blocks[-1].T @ matrix)
    basis = torch.cat(blocks, dim=1)
    # SVD of the k x n projection C = K^T M through C^T = Q_c R_c: C = svd(R_c^T) Q_c^T (a k x k SVD).
    factor, triangle = torch.linalg.qr(torch.cat(projections).T)
    small_u, singular, small_vh = torch.linalg.svd(triangle.T)
    vh = small_vh[:width] @ factor.T
    return basis @ small_u[:, :rank], singular[:rank], vh[:rank], vh[:width].T


@torch.no_grad()
def loftq_init(weight: torch.Tensor, bits: int, rank: int, num_iter: int = 5, method: str = "nf", block_size: int = 64,
               absmax_dtype: torch.dtype | None = None, svd: str = "truncated", svd_oversampling: int = 0,
               svd_iters: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: returns ``(q_weight, lora_A, lora_B)`` (float32, on ``weight``'s device) with W ~ Q + B @ A.

    Each step: Q <- fake_quantize(W - B A); then B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T from the top-r SVD of W - Q
    (``truncated_svd`` starts from a fixed-seed Gaussian block: deterministic, the global RNG untouched)."""
    check_quant_args(bits, method, block_size)
    check_svd_args(svd, svd_oversampling, svd_iters)
    if weight.dim() != 2:
        raise ValueError(f"loftq_init needs a 2-D weight, got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(weight.shape):
        raise ValueError(f"LoRA rank must be in [1, {min(weight.shape)}] for a weight of shape "
                         f"{tuple(weight.shape)}, got {rank!r}")
    if num_iter < 1:
        raise ValueError(f"loftq iterations must be >= 1, got {num_iter}")
    w = weight.float()
    generator = torch.Generator(device=w.device).manual_seed(0)
    lora_A = lora_B = right_basis = None
    # Weight-sized buffers allocated once for the loop: ``work`` holds W - B A, then (once quantized) W - Q.
    work = torch.empty_like(w)
    q_weight = torch.empty_like(w) if method == "nf" else None
    scratch = _normal_float_scratch(w) if method == "nf" else None
    for _ in range(num_iter):
        target = w if lora_A is None else torch.addmm(w, lora_B, lora_A, alpha=-1, out=work)  # W - B A
        if method == "nf":
            _normal_float(target, bits, block_size, absmax_dtype, out=q_weight, scratch=scratch)
        else:
            q_weight = _uniform(target, bits)
        residual = torch.sub(w, q_weight, out=work)
        if svd == "exact":
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:
            u, s, vh, right_basis = truncated_svd(residual, rank, svd_oversampling, svd_iters, right_basis, generator)
        del residual
        root = s.sqrt()
        lora_B, lora_A = u * root, root[:, None] * vh
    return q_weight, lora_A.contiguous(), lora_B.contiguous()
