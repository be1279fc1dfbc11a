"""Monte-Carlo prediction with an Llmm model: average the predictive distributions of N sampled networks.

    probs = mc_predict(model, batch, mc_samples=10)                       # (batch, classes); rows sum to 1
    probs = mc_predict(model, batch, 10, seed=0, batched=True)           # N networks in one forward
    scores = llmm.metrics.calibration_metrics(probs.numpy(), labels)

Each network is one noise draw per factor per layer (per example with ``noise_per_example``), in eval mode with
every Llmm layer sampling: p(y | x) ~= 1/N sum_n softmax(f(x; A~_n, B~_n)).

- ``seed=None`` (sequential only): the model's own generator, network after network, as in training.
- ``seed`` given: network n draws from its own stream (``llmm.noise.mc_streams``), leaving the training generator
  untouched; each call restarts the streams, so network n is the same network on every batch. ``batched=True``
  runs the N networks in one forward over the batch repeated N times and equals the sequential run network for
  network (bit for bit where the backbone's kernels do not depend on the batch size; DeBERTa within 1e-7). On one
  CPU thread batching does not pay (benchmarks/bench_mc.py); it is meant for accelerators.

``mc_regress`` averages the raw outputs instead (regression heads); ``mc_letter_probs`` is the multiple-choice
family's answer-letter distribution."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmm.model import llmm_layers, noise_mode, noise_source
from llmm.noise import checked_integer, mc_streams

LABEL_KEYS = ("labels", "label")


def _repeat(inputs: dict, n: int) -> dict:
    sizes = {value.shape[0] for value in inputs.values() if torch.is_tensor(value) and value.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batched Monte-Carlo needs every input tensor to lead with the batch size, got sizes {sizes}")
    return {key: value.repeat(n, *[1] * (value.dim() - 1)) if torch.is_tensor(value) and value.dim() > 0 else value
            for key, value in inputs.items()}


def _logits(output) -> torch.Tensor:
    logits = output if torch.is_tensor(output) else output.logits if hasattr(output, "logits") else output[0]
    return logits.float()


@torch.no_grad()
def sampled_outputs(model: torch.nn.Module, batch: Mapping, mc_samples: int, seed: int | None = None,
                    batched: bool = False, transform=None) -> torch.Tensor:
    """(mc_samples, *output shape): the model's logits under mc_samples sampled networks, in eval mode, each
    network's float32 logits passed through ``transform`` if given (to reduce an LM's logits network by network)."""
    transform = transform or (lambda logits: logits)
    checked_integer(mc_samples, "mc_samples", 1)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's inputs (e.g. {{'input_ids': ..., 'attention_mask': "
                        f"...}}), got {type(batch).__name__}")
    if not llmm_layers(model):
        raise ValueError("mc_predict needs a model with Llmm layers (llmm.get_llmm_model / llmm.load_llmm_model)")
    if batched and seed is None:
        raise ValueError("batched Monte-Carlo draws each network from its own stream: pass seed=<an integer >= 0>")
    inputs = {key: value for key, value in batch.items() if key not in LABEL_KEYS}
    streams = None if seed is None else mc_streams(seed, mc_samples)
    was_training = model.training
    model.eval()
    try:
        with noise_mode(model, "sample"):
            if streams is None:
                outputs = [transform(_logits(model(**inputs))) for _ in range(mc_samples)]
            elif batched:
                with noise_source(model).networks(streams):
                    chunks = _logits(model(**_repeat(inputs, mc_samples))).chunk(mc_samples)
                    outputs = [transform(chunk) for chunk in chunks]
            else:
                outputs = []
                for network in range(mc_samples):
                    with noise_source(model).networks(streams.subset(network)):
                        outputs.append(transform(_logits(model(**inputs))))
    finally:
        model.train(was_training)
    return torch.stack(outputs)


def mc_predict(model: torch.nn.Module, batch: Mapping, mc_samples: int, seed: int | None = None,
               batched: bool = False) -> torch.Tensor:
    """The mean of the N sampled networks' softmax distributions, (batch, classes), float32."""
    return sampled_outputs(model, batch, mc_samples, seed, batched).softmax(dim=-1).mean(dim=0)


def mc_regress(model: torch.nn.Module, batch: Mapping, mc_samples: int, seed: int | None = None,
               batched: bool = False) -> torch.Tensor:
    """The mean of the N sampled networks' outputs (regression heads), float32."""
    return sampled_outputs(model, batch, mc_samples, seed, batched).mean(dim=0)


def mc_letter_probs(model: torch.nn.Module, batch: Mapping, letter_ids: list[int], mc_samples: int,
                    seed: int | None = None, batched: bool = False) -> torch.Tensor:
    """A causal LM's Monte-Carlo answer-letter distribution, (batch, letters): ``batch`` holds ``input_ids``,
    ``attention_mask`` (right-padded) and ``n_choices`` (letters past a question's choices get probability 0)."""
    from llmm.tasks.calibration import LetterHead  # the task module imports this one

    head = model if isinstance(model, LetterHead) else LetterHead(model, letter_ids)
    return mc_predict(head, batch, mc_samples, seed, batched)
