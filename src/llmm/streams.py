"""Independent random streams from one seed: the seeds of N Monte-Carlo networks, checked seeds.

    seeds = network_seeds(17, 3)      # three 63-bit seeds, one per sampled network (numpy SeedSequence.spawn)
    check_seed(args.seed, "--seed")   # an integer in 0 .. 2**32 - 1 (what numpy's legacy seeding accepts)

Unlike ``seed + d`` for network d (neighbouring seeds would share networks), ``SeedSequence(seed).spawn(n)`` gives
streams independent across networks and seeds, the same on every machine."""

from __future__ import annotations

import numpy as np

MAX_SEED = 2**32 - 1  # numpy.random.seed (called by transformers.set_seed) refuses more


def check_seed(seed, flag: str = "--seed") -> int:
    """``seed`` as an int in 0 .. MAX_SEED, else a ValueError naming ``flag``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"{flag} must be an integer in 0..{MAX_SEED} (2^32 - 1), got {seed!r}: pass a smaller "
                         "non-negative seed")
    return int(seed)


def network_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``n`` sampled networks drawn under ``seed``: child d of SeedSequence(seed).spawn(n), as one
    63-bit integer each (torch.Generator.manual_seed takes it). The first k of n are the first k of any n' > k."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of networks must be a non-negative integer, got {n!r}")
    return [int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
            for child in np.random.SeedSequence(int(seed)).spawn(int(n))]
