"""The Llmm noise: where every eps comes from (one generator per device per model, and Monte-Carlo network streams).

A model's Llmm layers share one ``NoiseSource`` (``layer.llmm_noise``). It never touches torch's global generator,
so runs of different methods (K > 0 or K = 0) with the same seed share data order and dropout masks (common random
numbers). A layer's eps for one model forward (``NoiseSource.eps``) is:

- ``(2, K)``: one draw per factor (A and B) shared by the whole batch (the paper);
- ``(2, rows, K)``: one draw per example (leading batch dimension), with ``noise_per_example=True``;
- ``(2, N, K)`` while ``networks(streams)`` is active: N Monte-Carlo networks in one forward over the batch
  repeated N times, copy n drawing from stream n (per example: (2, rows, K)). A network's draws are the same
  whether it runs alone or batched with others.

``mc_streams(seed, n)`` derives the N networks' generators with ``numpy.random.SeedSequence(seed).spawn(n)``:
independent across seeds, and drawing them never advances the training generators."""

from __future__ import annotations

import contextlib
import math
import numbers
import zlib

import numpy as np
import torch
from torch import nn


def _generator(device: torch.device, sequence: np.random.SeedSequence) -> torch.Generator:
    words = sequence.generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) << 32 | int(words[1]))


class NoiseStreams:
    """N independent Monte-Carlo network streams: network n's torch generator per device, from its SeedSequence."""

    def __init__(self, children: list[np.random.SeedSequence]):
        self.children = children
        self.generators: dict[str, list[torch.Generator]] = {}

    def __len__(self) -> int:
        return len(self.children)

    def subset(self, index: int) -> "NoiseStreams":
        """Network ``index`` alone (its stream continues where it stands: the same draws as within the batch)."""
        single = NoiseStreams([self.children[index]])
        single.generators = {key: [gens[index]] for key, gens in self.generators.items()}
        return single

    def for_device(self, device: torch.device) -> list[torch.Generator]:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = [_generator(device, np.random.SeedSequence(
                child.entropy, spawn_key=(*child.spawn_key, zlib.crc32(key.encode())))) for child in self.children]
        return self.generators[key]


def checked_integer(value, what: str, low: int) -> int:
    """``value`` as an int, checked to be an integer (Python's or numpy's) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return int(value)


def checked_number(value, what: str, positive: bool = False) -> float:
    """``value`` as a float, checked to be a finite number >= 0 (> 0 if ``positive``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        raise ValueError(f"{what} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def mc_streams(seed: int, mc_samples: int) -> NoiseStreams:
    """The generators of N Monte-Carlo networks: ``numpy.random.SeedSequence(seed).spawn(mc_samples)``."""
    seed = checked_integer(seed, "the Monte-Carlo seed", 0)
    return NoiseStreams(np.random.SeedSequence(seed).spawn(checked_integer(mc_samples, "mc_samples", 1)))


class NoiseSource:
    """The Llmm noise of one model: a torch.Generator per device, seeded from (seed, process index, device).

    A forward pre-hook on the backbone calls ``new_forward`` at every model forward (every decoded token); a layer
    draws its eps at its first call within a model forward and reuses it within the same forward. That keeps
    gradient checkpointing exact: its re-run in backward restores torch's RNG states, not this generator, and finds
    the eps of its forward (so backward a forward before the next one, as every training loop does)."""

    def __init__(self, seed: int, process_index: int = 0):
        self.forward_id = 0
        self.streams: NoiseStreams | None = None
        self.seed(seed, process_index)

    def seed(self, seed: int, process_index: int = 0) -> None:
        self.entropy = (checked_integer(seed, "noise seed", 0),
                        checked_integer(process_index, "noise process_index", 0))
        self.generators: dict[str, torch.Generator] = {}
        self.forward_id += 1  # draws cached before the re-seed are not reused

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = _generator(device, np.random.SeedSequence([*self.entropy, zlib.crc32(key.encode())]))
        return self.generators[key]

    def new_forward(self, *_) -> None:
        """A model forward begins: the layers draw fresh eps."""
        self.forward_id += 1

    @contextlib.contextmanager
    def networks(self, streams: NoiseStreams):
        """Within: every draw comes from ``streams`` (network n for batch copy n); the training generators rest."""
        previous, self.streams = self.streams, streams
        self.forward_id += 1
        try:
            yield self
        finally:
            self.streams = previous
            self.forward_id += 1

    def eps(self, layer: nn.Module, adapter_name: str, k: int, device: torch.device, rows: int,
            per_example: bool = False) -> torch.Tensor:
        """Standard normal draws for ``layer``'s factors A and B in the current model forward (shapes: see above).
        A layer called again within the forward (DeBERTa-v3's query / key projections also project the relative
        embeddings, with share_att_key) gets the same draws: one network per forward."""
        streams = self.streams
        if streams is not None and rows % len(streams):
            raise ValueError(f"{len(streams)} Monte-Carlo networks in one forward need every Llmm layer to be called "
                             f"on the batch repeated once per network (a multiple of {len(streams)} rows), got {rows}"
                             " (a tensor the batch shares, e.g. DeBERTa-v3's relative embeddings): use batched=False")
        key = (self.forward_id, str(device))
        cache = layer.__dict__.setdefault("_llmm_eps", {})
        cached = cache.get(adapter_name)
        if cached is not None and cached[0] == key:
            if per_example and cached[1].shape[1] != rows:
                raise ValueError(f"per-example noise: an Llmm layer is called twice in one forward, on "
                                 f"{cached[1].shape[1]} rows and on {rows} (a tensor the batch shares, e.g. "
                                 "DeBERTa-v3's relative embeddings with share_att_key), so no one example's network "
                                 "applies there: use noise_per_example false")
            return cached[1]
        if streams is None:
            shape = (2, rows, k) if per_example else (2, k)
            eps = torch.randn(*shape, device=device, dtype=torch.float32, generator=self.generator(device))
        else:
            eps = torch.cat([torch.randn(2, rows // len(streams) if per_example else 1, k, device=device,
                                         dtype=torch.float32, generator=generator)
                             for generator in streams.for_device(device)], dim=1)
        cache[adapter_name] = (key, eps)
        return eps

    def state_dict(self) -> dict:
        return {"entropy": list(self.entropy), "generators": {key: g.get_state() for key, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed(*state["entropy"])
        for key, generator_state in state["generators"].items():
            self.generator(torch.device(key)).set_state(generator_state)
