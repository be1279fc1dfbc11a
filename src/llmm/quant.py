"""Quantizers (normal-float blockwise, uniform) and LoftQ initialization; fake-quant on any device.

- ``fake_quantize(w, bits, method="nf")``: blockwise absmax normal-float. At 4 bits the code book, the scaling
  (x * (1 / absmax)) and the rounding (nearest code, via the midpoints) are bitsandbytes' NF4, so the result
  equals ``dequantize_4bit(quantize_4bit(w, blocksize=64, quant_type="nf4"))`` element for element. At 2 and 8
  bits the code book is LoftQ's asymmetric normal map (2^bits values).
- ``method="uniform"``: clip to mean +- 2 std of the tensor, then 2^bits evenly spaced levels from the min to the
  max of the clipped tensor (LoftQ's GLUE quantizer, its formula exactly).
- ``loftq_init(w, bits, rank)``: T alternating steps Q <- quant(W - B A); (B, A) <- best rank-r fit of W - Q, by
  the exact SVD or by ``truncated_svd`` (randomized block Krylov, warm-started from the previous step).

All of it is vectorised and stays on the weight's device (no host copy, no ``.item()``): memory is a few times the
weight, never weight x levels (torch.bucketize over sorted code midpoints) and never a full SVD's factors when
truncated.
"""

from __future__ import annotations

from functools import cache

import torch
from scipy.stats import norm

ALLOWED_BITS = (2, 4, 8)
ALLOWED_METHODS = ("nf", "uniform")
ALLOWED_SVD = ("exact", "truncated")
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
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)
    low, high = torch.aminmax(blocks, dim=1, keepdim=True)
    absmax = torch.maximum(high, -low)  # = blocks.abs().amax(1), without a weight-sized temporary
    if absmax_dtype is not None:
        # Round the block scale to the storage dtype, so that a 16-bit copy of Q re-quantizes losslessly.
        absmax = absmax.to(absmax_dtype).float()
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))).clamp_(-1, 1)
    nearest = torch.bucketize(scaled, midpoints, out_int32=True)
    del scaled
    dequantized = code.index_select(0, nearest.view(-1)).view_as(blocks).mul_(absmax)
    return dequantized.view(-1)[: flat.numel()].view(weight.shape)


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


def check_svd_args(svd: str, oversampling: int, iterations: int) -> None:
    """Raise a ValueError naming the bad LoftQ SVD setting and what is allowed."""
    if svd not in ALLOWED_SVD:
        raise ValueError(f"loftq_svd must be one of {ALLOWED_SVD}, got {svd!r}")
    for name, value in (("loftq_svd_oversampling", oversampling), ("loftq_svd_iters", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    oversampling: int,
    iterations: int,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``matrix`` (m x n) by a randomized block Krylov method.

    A block of l = rank + oversampling columns (``start``, n x l, e.g. the previous call's right basis: a warm
    start; else Gaussian) spans Y_0 = M start; each of ``iterations`` power steps adds Y_i = (M M^T) Y_{i-1},
    orthogonalised against the earlier blocks. Keeping every block (not only the last one, as plain subspace
    iteration does) is what makes this accurate on the nearly flat spectra of quantization residuals (Musco &
    Musco, NeurIPS 2015). The exact SVD of the small projection K^T M (K = orthonormal basis of all blocks, at
    most l (iterations + 1) columns) gives the triplets (Rayleigh-Ritz). Cost: 2 iterations + 2 products of M
    with a thin block. Where K would span min(m, n) columns anyway, the full SVD is the cheaper way to the same
    (exact) answer and is used. Returns ``(U_r, S_r, Vh_r, right_basis)``, ``right_basis`` (n x l) being the
    top-l right singular vectors found, to warm-start the next call.
    """
    rows, cols = matrix.shape
    width = rank + oversampling
    if width * (iterations + 1) >= min(rows, cols):
        u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], singular[:rank], vh[:rank], vh[:width].T
    if start is None:
        start = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    blocks = [torch.linalg.qr(matrix @ start).Q]
    for _ in range(iterations):
        block = matrix @ (blocks[-1].T @ matrix).T  # (B^T M)^T: M^T B without a strided pass over M
        earlier = torch.cat(blocks, dim=1)
        for _ in range(2):  # block Gram-Schmidt, twice ("twice is enough")
            block = block - earlier @ (earlier.T @ block)
        blocks.append(torch.linalg.qr(block).Q)
    basis = torch.linalg.qr(torch.cat(blocks, dim=1)).Q  # orthonormal even if a block lost rank
    # SVD of the k x n projection C = K^T M through C^T = Q_c R_c: C = svd(R_c^T) Q_c^T (a k x k SVD).
    factor, triangle = torch.linalg.qr((basis.T @ matrix).T)
    small_u, singular, small_vh = torch.linalg.svd(triangle.T)
    vh = small_vh[:width] @ factor.T
    return basis @ small_u[:, :rank], singular[:rank], vh[:rank], vh[:width].T


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    bits: int,
    rank: int,
    num_iter: int = 5,
    method: str = "nf",
    block_size: int = 64,
    absmax_dtype: torch.dtype | None = None,
    svd: str = "truncated",
    svd_oversampling: int = 0,
    svd_iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: returns ``(q_weight, lora_A, lora_B)`` (float32, on ``weight``'s device) with W ~ Q + B @ A.

    Each step: Q <- fake_quantize(W - B A); then B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T from the top-r SVD of
    W - Q: ``svd="exact"`` (torch.linalg.svd, all min(m, n) triplets) or ``"truncated"`` (``truncated_svd``,
    started from the previous step's right basis; the first step from a fixed-seed Gaussian block, so the result
    is deterministic and the global RNG is untouched).
    """
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
    for _ in range(num_iter):
        target = w if lora_A is None else torch.addmm(w, lora_B, lora_A, alpha=-1)  # W - B A
        q_weight = fake_quantize(target, bits, method, block_size, absmax_dtype)
        del target
        residual = torch.sub(w, q_weight)
        if svd == "exact":
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            u, s, vh = u[:, :rank], s[:rank], vh[:rank]
        else:
            u, s, vh, right_basis = truncated_svd(residual, rank, svd_oversampling, svd_iters, right_basis,
                                                  generator)
        del residual
        root = s.sqrt()
        lora_B = u * root
        lora_A = root[:, None] * vh
    return q_weight, lora_A.contiguous(), lora_B.contiguous()
