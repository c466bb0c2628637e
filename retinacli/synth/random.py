"""Deterministic random streams: every draw is keyed by (seed, purpose, patient, eye, visit, ...).

Keying by name rather than drawing from one shared stream keeps a patient's anatomy the same when
the cohort size or the image sizes change, and makes the output a pure function of the seed.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _key(part: object) -> int:
    if isinstance(part, (int, np.integer)) and part >= 0:
        return int(part)
    return int.from_bytes(hashlib.sha256(str(part).encode()).digest()[:8], "little")


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    """A generator for one named purpose, e.g. ``rng_for(seed, "eye", 3, "OD")``."""
    return np.random.default_rng([_key(seed), *(_key(p) for p in parts)])
