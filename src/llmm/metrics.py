"""Calibration metrics of a classifier's predictive distribution: NLL, Brier score, expected calibration error.

    scores = calibration_metrics(probs, labels)      # {"nll": .., "brier": .., "ece": ..}

``probs`` is (n, C) with rows summing to one (a softmax, or ``llmm.predict.mc_predict``'s average of N sampled
networks); ``labels`` is (n,) class ids. Conventions (lower is better for all three):

- NLL = -mean_i log p_i[y_i] (natural log; probabilities clipped at 1e-12).
- Brier = mean_i sum_c (p_i[c] - 1[c = y_i])^2, the multi-class form (Brier 1950); in [0, 2].
- ECE (Guo et al. 2017) with 15 equal-width confidence bins: confidence = max_c p_i[c], bin b = (b/15, (b+1)/15]
  (right-closed), ECE = sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def _check(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need probs of shape (n, classes) and labels of shape (n,), got {probs.shape} and "
                         f"{labels.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs hold NaN or inf: the model's outputs are not finite (a diverged model, or noise too "
                         "wide for its precision)")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3) or (probs < 0).any():
        raise ValueError("probs rows must be probability distributions (non-negative, summing to 1): pass "
                         "softmax(logits), not logits")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must be class ids in 0..{probs.shape[1] - 1}")
    return probs, labels


def nll(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def brier(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def ece(probs, labels, n_bins: int = ECE_BINS) -> float:
    return binned_ece(reliability_bins(probs, labels, n_bins))


def binned_ece(bins: dict) -> float:
    """Sum over the reliability bins of (share of the examples) x |accuracy - mean confidence|."""
    n = sum(bins["count"])
    return float(sum(count / n * abs(accuracy - confidence) for count, confidence, accuracy
                     in zip(bins["count"], bins["confidence"], bins["accuracy"]) if count))


def calibration_metrics(probs, labels, n_bins: int = ECE_BINS, bins: dict | None = None) -> dict[str, float]:
    """NLL, Brier and ECE; ``bins``: the reliability bins already formed (reliability_bins), so ECE reuses them."""
    return {"nll": nll(probs, labels), "brier": brier(probs, labels),
            "ece": binned_ece(bins) if bins is not None else ece(probs, labels, n_bins)}


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> dict[str, list]:
    """The reliability diagram's bins (``ece``'s): per bin the count, mean confidence and accuracy (None for an empty
    bin). Bin b holds confidences in (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 cannot occur (max >= 1/C)."""
    probs, labels = _check(probs, labels)
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]  # exact edges: ceil(c * n) misbins c = b / n by rounding
    bins = np.digitize(confidence, edges, right=True)
    members = [bins == b for b in range(n_bins)]
    return {"count": [int(m.sum()) for m in members],
            "confidence": [float(confidence[m].mean()) if m.any() else None for m in members],
            "accuracy": [float(correct[m].mean()) if m.any() else None for m in members]}
