"""The width-search step after training (any family with a validation split): with M and Z fixed, the multiplier m
of the noise (F~ = M + m sum_k eps_k Z[k] / sqrt(s)) is chosen on validation data, then used by every later
Monte-Carlo evaluation and saved in the adapter config (``noise_width``), so re-evaluations reuse it.

    record = search_width(model, validation_nll, settings, "on 64 validation questions")  # logged
    # settings: noise_width_search, noise_width_tolerance, noise_width_grid

``validation_nll(m)`` is the family's validation NLL of the Monte-Carlo prediction under ``llmm.noise_width(model,
m)`` (networks from a fixed seed's own streams, never the training generator). Both rules are computed
(llmm.width.choose_noise_width: TFB's tolerance rule and the NLL minimiser); the setting says which m is used.
The record holds what recomputes both: nll(0), the tfb threshold nll(0) (1 + tolerance) and every [m, nll]."""

from __future__ import annotations

import logging
import time

from llmm.model import llmm_layers, noise_width
from llmm.width import choose_noise_width

RULES = {"tfb": "tfb", "nll": "nll_min"}  # the setting's value -> choose_noise_width's key
logger = logging.getLogger("llmm")


def apply_noise_width(model, multiplier: float) -> None:
    """From now on every Llmm layer draws its noise ``multiplier`` times as wide, and the adapter config says so
    (saved adapters carry it: a reloaded run evaluates with the same m)."""
    for layer in llmm_layers(model):
        for layer_settings in layer.llmm_settings.values():
            layer_settings["width"] = float(multiplier)
    model.peft_config["default"].noise_width = float(multiplier)


def noise_width_in_use(model) -> float:
    """The noise-width multiplier m the adapter evaluates with (1 = the paper; a width search may have set it)."""
    return float(getattr(model.peft_config["default"], "noise_width", 1.0)) if hasattr(model, "peft_config") else 1.0


def search_width(model, validation_nll, settings, where: str = "on the validation data") -> dict:
    """Run both rules on ``validation_nll``, apply the m that ``settings.noise_width_search`` (tfb or nll) names, log
    both (``where``: the validation data, as the log names it), and return the record for results.json."""
    rule, started = settings.noise_width_search, time.time()

    def nll(m: float) -> float:
        with noise_width(model, m):
            return validation_nll(m)

    found = choose_noise_width(nll, tolerance=settings.noise_width_tolerance, grid=settings.noise_width_grid)
    chosen = found[RULES[rule]]
    apply_noise_width(model, chosen)
    logger.info("noise width %s: tfb m = %.4g, nll m = %.4g; using %s m = %.4g", where, found["tfb"],
                found["nll_min"], rule, chosen)
    edge = max(settings.noise_width_grid)
    if found["nll_min"] == edge:  # the NLL still falls at the grid's widest m: its minimum may lie beyond
        logger.warning("the nll rule chose the grid's largest width, m = %g (the validation NLL still falls there): "
                       "its minimum may be wider; try a wider --noise_width_grid (e.g. ... %g %g)", edge, 2 * edge,
                       4 * edge)
    return {"rule": rule, "chosen": chosen, "tfb": found["tfb"], "nll_min": found["nll_min"],
            "tolerance": found["tolerance"], "nll_0": found["nll_0"], "tfb_threshold": found["tfb_threshold"],
            "grid": list(settings.noise_width_grid), "nll_min_at_grid_edge": found["nll_min"] == edge,
            "evaluations": found["evaluations"], "wall_time_s": time.time() - started}
