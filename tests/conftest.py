"""Shared fixtures: small galaxy files built from the synthetic sky."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cai.formats import GalaxyBatch, GalaxyWriter
from cai.sky import simulate_chunk

GALAXY_SEED = 20240


def small_batch(
    n: int, seed: int = GALAXY_SEED, first_object_id: int = 1
) -> GalaxyBatch:
    """``n`` realistic synthetic galaxies (n <= 4096), deterministic for ``seed``."""
    return simulate_chunk(n, seed, 0, first_object_id)


@pytest.fixture
def galaxy_file(tmp_path: Path) -> Callable[..., Path]:
    """A factory writing a galaxy file of ``n`` rows; returns its path.

    Call as ``galaxy_file(n)`` or ``galaxy_file(n, name="x.h5", seed=1,
    first_object_id=1, provenance={...})``; files land in ``tmp_path``.
    """

    def make(
        n: int,
        name: str = "galaxies.h5",
        seed: int = GALAXY_SEED,
        first_object_id: int = 1,
        provenance: dict | None = None,
    ) -> Path:
        path = tmp_path / name
        batch = small_batch(n, seed, first_object_id)
        with GalaxyWriter(path, n, provenance or {"tool": "test", "seed": seed}) as w:
            w.append(batch)
        return path

    return make
