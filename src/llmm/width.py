"""How wide the learned Gaussian over the LoRA factors is, and choosing a noise-width multiplier after training.

MeMoTune's objective has no prior or KL term, so nothing keeps the directions Z from shrinking; this measures it.
As E||sum_k eps_k Z[k] / sqrt(s)||^2 = ||Z||_F^2 / s, the noise's RMS norm over the mean's norm is

    width(F) = ||Z||_F / (sqrt(s) ||M||_F)          (0: a point estimate; None where ||M|| = 0, LoRA's B at init)

    per_layer = distribution_width(model)       # {"<module>": {"A": 0.004, "B": 0.01}}
    summary = width_summary(per_layer)          # {"A": {"median": .., "max": .., "mean": ..}, "B": {...}}
    m = choose_noise_width(nll)["tfb"]          # then llmm.noise_width(model, m)"""

from __future__ import annotations

import math
import statistics

import torch

from llmm.model import llmm_layers
from llmm.noise import checked_integer, checked_number

FACTORS = ("A", "B")


@torch.no_grad()
def distribution_width(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, dict]:
    """{module name: {"A": width or None, "B": width or None}} over every Llmm layer of ``model``."""
    layers = set(map(id, llmm_layers(model)))
    widths = {}
    for name, module in model.named_modules():
        if id(module) not in layers or adapter_name not in module.llmm_settings:
            continue
        variant, scale = module.lora_variant[adapter_name], module.llmm_settings[adapter_name]["scale"]
        widths[name] = {}
        for factor, mean, directions in zip(FACTORS, variant.means(module, adapter_name),
                                            variant.directions(module, adapter_name)):
            mean, noise = mean.float().norm().item(), directions.float().norm().item() / math.sqrt(scale)
            widths[name][factor] = noise / mean if mean > 0 else None
    return widths


def width_summary(per_layer: dict[str, dict]) -> dict[str, dict]:
    """Median, mean and max of the per-layer widths, per factor (layers with None left out)."""
    summary = {}
    for factor in FACTORS:
        values = [w[factor] for w in per_layer.values() if w[factor] is not None]
        summary[factor] = ({"median": statistics.median(values), "mean": statistics.fmean(values),
                            "max": max(values), "layers": len(values)} if values else None)
    return summary


# ------------------------------------------------------------------------- choosing the width on validation data
TFB_TOLERANCE = 0.003  # TFB's threshold: 0.3 % relative NLL change
WIDTH_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def choose_noise_width(nll, tolerance: float = TFB_TOLERANCE, grid=WIDTH_GRID, refine_steps: int = 4) -> dict:
    """Choose the noise-width multiplier m from ``nll(m)``, the validation NLL of the Monte-Carlo prediction with
    noise m times as wide. Two rules:

    - ``tfb`` (Training-Free Bayesianization): the largest m evaluated whose NLL is within the tolerance of the
      mean network's, nll(m) <= nll(0) + ``tolerance`` |nll(0)| (a decrease always qualifies), over the whole grid:
      a failing m does not stop the search (the NLL need not grow with m; a wider noise may lower it again);
    - ``nll_min``: the m that minimises nll(m) (m = 0 included).

    The grid, then ``refine_steps`` bisection steps between the largest qualifying grid value and the grid value
    above it (``tfb``) and golden-section steps around the best one (``nll_min``); every m evaluated is a candidate
    of both rules, so the record recomputes both: ``tfb`` is the largest m of ``evaluations`` with an nll at most
    ``tfb_threshold``, ``nll_min`` the smallest m of the least nll. A non-finite nll(m) (m > 0) counts as inf.
    Returns {"tfb": m, "nll_min": m, "tolerance": .., "nll_0": nll(0), "tfb_threshold": .., "evaluations":
    [[m, nll], ...] in m order, a non-finite nll as None}."""
    checked_number(tolerance, "the width tolerance")
    grid = sorted(float(m) for m in grid)
    if not grid or grid[0] <= 0 or not all(math.isfinite(m) for m in grid):
        raise ValueError(f"the width grid must hold finite numbers > 0, got {grid!r}")
    checked_integer(refine_steps, "refine_steps", 0)
    seen: dict[float, float] = {}

    def value(m: float) -> float:
        if m not in seen:
            seen[m] = float(nll(m))
            if not math.isfinite(seen[m]):
                if m == 0.0:
                    raise ValueError(f"the validation NLL of the mean network (m = 0) is {seen[m]}: check the model "
                                     "and data")
                seen[m] = math.inf  # noise too wide for the model's precision: never chosen
        return seen[m]

    base = value(0.0)
    threshold = base + tolerance * abs(base)  # TFB: relative change (nll(m) - nll(0)) / |nll(0)| <= tolerance

    def within(m: float) -> bool:
        return value(m) <= threshold

    qualifying = [m for m in grid if within(m)]  # every grid value is evaluated: a failing one stops nothing
    low = qualifying[-1] if qualifying else 0.0  # tfb: low qualifies, high (the grid value above it) does not
    high = next((m for m in grid if m > low), None)
    if high is not None:
        for _ in range(refine_steps):
            middle = (low + high) / 2
            low, high = (middle, high) if within(middle) else (low, middle)
    points = [0.0, *grid]
    best = min(points, key=lambda m: (value(m), m))
    index = points.index(best)
    left, right = points[max(index - 1, 0)], points[min(index + 1, len(points) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    a, b = right - golden * (right - left), left + golden * (right - left)
    for _ in range(refine_steps if right > left else 0):
        if value(a) <= value(b):
            right, b = b, a
            a = right - golden * (right - left)
        else:
            left, a = a, b
            b = left + golden * (right - left)
    nll_min = min(seen, key=lambda m: (seen[m], m))
    tfb = max(m for m in seen if within(m))  # m = 0 always qualifies
    return {"tfb": tfb, "nll_min": nll_min, "tolerance": float(tolerance), "nll_0": base, "tfb_threshold": threshold,
            "evaluations": [[m, seen[m] if math.isfinite(seen[m]) else None] for m in sorted(seen)]}
