"""Answer distributions of a causal LM over the letters of multiple-choice questions, and their calibration.

    head = LetterHead(peft_model, letter_ids)                 # logits of " A", " B", ... at each question's cue
    probs, labels = predict(head, batches, mode="mc", mc_samples=10)
    report = evaluate(probs, labels)                          # accuracy, ECE (15 bins), NLL, Brier

Modes, each one distribution p(letter | question) over the question's own choices: ``mean`` (eps = 0), ``sample``
(one noise draw per batch), ``mc`` (average softmax of N sampled networks, ``llmm.mc_predict``), ``dropout``
(MC-dropout: N passes with dropout on, noise at its mean); a deep ensemble (scripts.test_mcq) averages M
adapters' mean-mode distributions."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import bitsandbytes as bnb
import numpy as np
import torch
from bitsandbytes.functional import has_avx512bf16
from torch import nn

from llmm.metrics import ECE_BINS, calibration_metrics, reliability_bins
from llmm.model import llmm_layers, noise_mode
from llmm.noise import checked_integer
from llmm.predict import mc_predict

MODES = ("mean", "sample", "mc", "dropout")
SAMPLED_MODES = ("mc", "dropout")  # modes that average mc_samples passes


def letter_logits(model, input_ids, attention_mask, n_choices, letter_ids: torch.Tensor) -> torch.Tensor:
    """(batch, len(letter_ids)) float32 logits of the letters at each row's last token; -inf past its choices."""
    last = attention_mask.sum(dim=1) - 1
    positions = torch.unique(last)  # sorted; a few distinct positions, not the whole sequence
    output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions)
    rows = output.logits[torch.arange(len(last), device=last.device), torch.searchsorted(positions, last)]
    logits = rows[:, letter_ids.to(rows.device)].float()
    beyond = torch.arange(len(letter_ids), device=logits.device)[None, :] >= n_choices.to(logits.device)[:, None]
    return logits.masked_fill(beyond, float("-inf"))


class LetterHead(nn.Module):
    """A causal LM seen as a classifier over answer letters (``llmm.mc_predict`` and dropout sampling use it)."""

    def __init__(self, model: nn.Module, letter_ids: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("letter_ids", torch.tensor(letter_ids), persistent=False)

    def forward(self, input_ids, attention_mask, n_choices):
        return SimpleNamespace(logits=letter_logits(self.model, input_ids, attention_mask, n_choices, self.letter_ids))


def collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-padded tensors of encoded questions (``llmm.tasks.mcq.encode_question``)."""
    width = max(len(f["input_ids"]) for f in features)
    pad = [width - len(f["input_ids"]) for f in features]
    return {"input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * p for f, p in zip(features, pad)]),
            "attention_mask": torch.tensor([f["attention_mask"] + [0] * p for f, p in zip(features, pad)]),
            "labels": torch.tensor([f["labels"] for f in features]),
            "n_choices": torch.tensor([f["n_choices"] for f in features])}


def batches(encoded: list[dict], batch_size: int, pad_token_id: int, device) -> list[dict]:
    return [{k: v.to(device) for k, v in collate(encoded[i:i + batch_size], pad_token_id).items()}
            for i in range(0, len(encoded), batch_size)]


@contextlib.contextmanager
def dropout_active(model: nn.Module):
    """Eval mode with every dropout layer switched on (MC-dropout); the model's modes are restored after."""
    was_training = model.training
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not any(m.p > 0 for m in dropouts):
        raise ValueError("MC-dropout needs dropout: the model has no dropout layer with p > 0 (train the "
                         "mcdropout method, which sets lora_dropout)")
    model.eval()
    for module in dropouts:
        module.train()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def cpu_4bit_as_plain_peft(model: nn.Module):
    """Within: every CPU bitsandbytes Linear4bit computes as in a freshly loaded model; after: each is exactly as
    before (weight, quant state, kernel choice).

    bitsandbytes 0.50 repacks a CPU weight in place at its first no-grad eval forward on an AVX512-BF16 CPU, then
    rounds input and block scales to bfloat16. Training turns that off (llmm.model.keep_cpu_4bit_trainable), so its
    evaluations would differ from a reloaded adapter's. Restoring the saved weight and quant state undoes the packing
    (bitsandbytes' own inverse is lossy), so training continues bit for bit."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"
              and hasattr(m, "support_avx512bf16_for_cpu")]
    saved = [(m, m.support_avx512bf16_for_cpu, m.weight.data, m.weight.quant_state,
              copy.deepcopy(m.weight.quant_state)) for m in layers]
    fresh = bool(has_avx512bf16()) if layers else False
    for module in layers:
        module.support_avx512bf16_for_cpu = fresh  # what Linear4bit.__init__ sets
    try:
        yield model
    finally:
        for module, flag, data, state, copied in saved:
            if module.weight.data is not data or getattr(state, "packing_format_for_cpu", False) != getattr(
                    copied, "packing_format_for_cpu", False):
                module.weight.data = data
                module.weight.quant_state = copied
                if getattr(module, "quant_state", None) is state:
                    module.quant_state = copied
            module.support_avx512bf16_for_cpu = flag


@torch.no_grad()
def predict(head: LetterHead, batches: list[dict], mode: str, mc_samples: int = 1, seed: int | None = None,
            batched: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, letters), labels (n,)) in the given mode; ``seed`` and ``batched`` reach ``mc_predict``. CPU 4-bit
    layers compute as freshly loaded (cpu_4bit_as_plain_peft), so training, test_mcq and plain PEFT agree."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; known: {MODES}")
    checked_integer(mc_samples, "mc_samples", 1)
    llmm_layers(head)  # every adapted layer is an Llmm layer (else the noise modes would silently do nothing)
    probs, labels = [], []
    with cpu_4bit_as_plain_peft(head):
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            if mode == "mc":
                p = mc_predict(head, batch, mc_samples, seed=seed, batched=batched)
            elif mode == "sample":
                p = mc_predict(head, batch, 1)
            elif mode == "dropout":
                with dropout_active(head), noise_mode(head, "mean"):
                    p = torch.stack([head(**inputs).logits.softmax(-1) for _ in range(mc_samples)]).mean(0)
            else:
                head.eval()
                with noise_mode(head, "mean"):
                    p = head(**inputs).logits.softmax(-1)
            probs.append(p.float().cpu())
            labels.append(batch["labels"].cpu())
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(labels).numpy()


def evaluate(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Accuracy, ECE, NLL and Brier of the distributions, with the reliability diagram's bins."""
    bins = reliability_bins(probs, labels, n_bins)
    return {"accuracy": float((probs.argmax(axis=1) == labels).mean()),
            **calibration_metrics(probs, labels, n_bins, bins), "n": int(len(labels)), "reliability": bins}


def question_records(probs: np.ndarray, labels: np.ndarray, n_choices, ids) -> list[dict]:
    """Per question ``{"id", "label", "probs" (over its own choices)}``: what a run saves to recompute its metrics."""
    probs, labels, n_choices, ids = np.asarray(probs), np.asarray(labels), list(n_choices), list(ids)
    if not len(probs) == len(labels) == len(n_choices) == len(ids):
        raise ValueError(f"{len(probs)} distributions, {len(labels)} labels, {len(n_choices)} choice counts and "
                         f"{len(ids)} ids: one of each per question")
    return [{"id": str(ident), "label": int(label), "probs": [float(p) for p in row[:n]]}
            for row, label, n, ident in zip(probs, labels, n_choices, ids)]


def evaluate_questions(records: list[dict], n_bins: int = ECE_BINS) -> dict:
    """``evaluate`` recomputed from saved ``question_records`` (the distributions padded with zeros)."""
    if not records:
        raise ValueError("no questions to evaluate")
    probs = np.zeros((len(records), max(len(r["probs"]) for r in records)))
    for row, record in zip(probs, records):
        row[:len(record["probs"])] = record["probs"]
    return evaluate(probs, np.array([r["label"] for r in records]), n_bins)


def plot_reliability(path, reports: dict[str, dict]) -> None:
    """One reliability diagram per report ({title: evaluate(...)}), with each bin's share of the questions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(reports), figsize=(3.6 * len(reports), 3.6), squeeze=False)
    for axis, (title, report) in zip(axes[0], reports.items()):
        bins = report["reliability"]
        width = 1.0 / len(bins["count"])
        lefts = np.arange(len(bins["count"])) * width
        accuracy = [a if a is not None else 0.0 for a in bins["accuracy"]]
        axis.bar(lefts, accuracy, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        axis.plot([0, 1], [0, 1], "--", color="gray")
        share = np.asarray(bins["count"]) / max(1, sum(bins["count"]))
        axis.bar(lefts, share, width=width, align="edge", color="red", alpha=0.25, label="share")
        axis.set_title(f"{title}\nacc {report['accuracy']:.3f}  ECE {report['ece']:.3f}", fontsize=9)
        axis.set(xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
