"""Monte-Carlo prediction with an Llmm model: average the predictive distributions of N sampled networks.

    probs = mc_predict(model, batch, n_samples=10)        # (batch, classes); rows sum to 1
    scores = llmm.metrics.calibration_metrics(probs.numpy(), labels)

Each of the N forward passes is one network: the model is put in eval mode (dropout off) and every Llmm layer
samples its factors (``noise_mode(model, "sample")``), so each pass draws one eps per factor per layer, shared by
the whole batch. The result is p(y | x) ~= 1/N sum_n softmax(f(x; A~_n, B~_n)). With Z = 0 (or K = 0) every pass
equals the mean network. Draws come from the model's own noise generator on its device (not torch's global one):
``llmm.seed_noise(model, seed)`` for repeatability.
``mc_regress`` averages the raw outputs instead (regression heads, e.g. STS-B).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmm.model import llmm_layers, noise_mode

LABEL_KEYS = ("labels", "label")


@torch.no_grad()
def sampled_outputs(model: torch.nn.Module, batch: Mapping, n_samples: int) -> torch.Tensor:
    """(n_samples, *output shape): the model's logits under n_samples independent noise draws, in eval mode."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not llmm_layers(model):
        raise ValueError("mc_predict needs a model with Llmm layers (llmm.get_llmm_model / llmm.load_llmm_model)")
    inputs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
    was_training = model.training
    model.eval()
    try:
        with noise_mode(model, "sample"):
            outputs = []
            for _ in range(n_samples):
                output = model(**inputs)
                outputs.append((output.logits if hasattr(output, "logits") else output[0]).float())
    finally:
        model.train(was_training)
    return torch.stack(outputs)


def mc_predict(model: torch.nn.Module, batch: Mapping, n_samples: int) -> torch.Tensor:
    """The mean of the N sampled networks' softmax distributions, (batch, classes), float32."""
    return sampled_outputs(model, batch, n_samples).softmax(dim=-1).mean(dim=0)


def mc_regress(model: torch.nn.Module, batch: Mapping, n_samples: int) -> torch.Tensor:
    """The mean of the N sampled networks' outputs (regression heads), float32."""
    return sampled_outputs(model, batch, n_samples).mean(dim=0)
