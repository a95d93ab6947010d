"""Per-row seeds for the fused sampler: a cheap, deterministic mix of two integers (splitmix64), so that a seeded
request's draw at each output position depends on its seed and that position only, never on the rest of the batch."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(a: int, b: int) -> int:
    """A seed in [0, 2**63) from two ints: mix_seed(request_seed, output_position) for a seeded request."""
    return _splitmix64(_splitmix64(a & _MASK64) ^ (b & _MASK64)) >> 1
