"""How wide the learned Gaussian over the LoRA factors is: the noise term's size relative to the mean.

MeMoTune's objective has no prior or KL term, so nothing keeps the directions Z from shrinking; this measures it.
For a factor F with mean M, K directions Z and scale s, the noise is sum_k eps_k Z[k] / sqrt(s) with
E||noise||^2 = ||Z||_F^2 / s, so

    width(F) = ||Z||_F / (sqrt(s) ||M||_F)          (RMS norm of the noise over the norm of the mean)

0 means a point estimate (K = 0, or Z = 0 at init); None where ||M|| = 0 (LoRA's B at init).

    per_layer = distribution_width(model)       # {"<module>": {"A": 0.004, "B": 0.01}}
    summary = width_summary(per_layer)          # {"A": {"median": .., "max": .., "mean": ..}, "B": {...}}
"""

from __future__ import annotations

import math
import statistics

import torch

from llmm.model import llmm_layers

FACTORS = ("A", "B")


@torch.no_grad()
def distribution_width(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, dict]:
    """{module name: {"A": width or None, "B": width or None}} over every Llmm layer of ``model``."""
    layers = set(map(id, llmm_layers(model)))
    widths = {}
    for name, module in model.named_modules():
        if id(module) not in layers or adapter_name not in module.llmm_settings:
            continue
        scale = module.llmm_settings[adapter_name]["scale"]
        widths[name] = {}
        for factor in FACTORS:
            mean = getattr(module, f"lora_{factor}")[adapter_name].weight.float().norm().item()
            noise = getattr(module, f"lora_llmm_{factor}")[adapter_name].weight.float().norm().item() / math.sqrt(scale)
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
