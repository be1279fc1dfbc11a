"""The width-search step after training (any family with a validation split): with M and Z fixed, the multiplier m
of the noise (F~ = M + m sum_k eps_k Z[k] / sqrt(s)) is chosen on validation data, then used by every later
Monte-Carlo evaluation and saved in the adapter config (``noise_width``), so re-evaluations reuse it.

    record = search_width(model, validation_nll, settings)   # settings: noise_width_search, _tolerance, _grid

``validation_nll(m)`` is the family's validation NLL of the Monte-Carlo prediction under ``llmm.noise_width(model,
m)`` (networks from a fixed seed's own streams, never the training generator). Both rules are computed
(llmm.width.choose_noise_width: TFB's tolerance rule and the NLL minimiser); the setting says which m is used.
"""

from __future__ import annotations

import time

from llmm.model import llmm_layers, noise_width
from llmm.width import choose_noise_width

RULES = {"tfb": "tfb", "nll": "nll_min"}  # the setting's value -> choose_noise_width's key


def apply_noise_width(model, multiplier: float, adapter_name: str = "default") -> None:
    """From now on every Llmm layer draws its noise ``multiplier`` times as wide, and the adapter config says so
    (saved adapters carry it: a reloaded run evaluates with the same m)."""
    for layer in llmm_layers(model):
        for layer_settings in layer.llmm_settings.values():
            layer_settings["width"] = float(multiplier)
    model.peft_config[adapter_name].noise_width = float(multiplier)


def noise_width_in_use(model) -> float:
    """The noise-width multiplier m the adapter evaluates with (1 = the paper; a width search may have set it)."""
    return float(getattr(model.peft_config["default"], "noise_width", 1.0)) if hasattr(model, "peft_config") else 1.0


def search_width(model, validation_nll, settings) -> dict:
    """Run both rules on ``validation_nll``, apply the m that ``settings.noise_width_search`` names, and return
    the record for results.json."""
    rule = settings.noise_width_search
    if rule not in RULES:
        raise ValueError(f"noise_width_search must be one of {sorted(RULES)} here, got {rule!r}")
    started = time.time()

    def nll(m: float) -> float:
        with noise_width(model, m):
            return validation_nll(m)

    found = choose_noise_width(nll, tolerance=settings.noise_width_tolerance, grid=settings.noise_width_grid)
    chosen = found[RULES[rule]]
    apply_noise_width(model, chosen)
    return {"rule": rule, "chosen": chosen, "tfb": found["tfb"], "nll_min": found["nll_min"],
            "tolerance": found["tolerance"], "grid": list(settings.noise_width_grid),
            "evaluations": found["evaluations"], "wall_time_s": time.time() - started}
