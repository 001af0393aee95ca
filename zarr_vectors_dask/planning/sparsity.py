"""Sparsity: the strategies built in, how many rows a level keeps, whether
the survivors depend on geometry (context), which rows survive, and the
registered selection function shipped to the workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["BUILTIN_STRATEGIES", "Sparsity", "target_count", "ranked", "context_rounds",
           "kept_rows", "selection_function"]


# ------------------------------------------------------------- stage 0
#: Strategies this project implements itself; any other name except the
#: reference's "random" is looked up in zarr-vectors' selection registry.
BUILTIN_STRATEGIES = ("random", "length")


def target_count(n_rows: int, sparsity_factor: float) -> int:
    """How many rows a sparsified level keeps: the reference's
    ``max(1, round(n * (1 / factor)))``, for every strategy."""
    return max(1, round(n_rows * (1.0 / sparsity_factor)))


def ranked(strategy: str, sparsity_factor: float, n_rows: int) -> bool:
    """Whether the survivors depend on the objects' geometry (so
    per-object lengths / points must be computed before ``object_table``):
    any strategy but ``random``, when the level drops rows at all."""
    return strategy != "random" and sparsity_factor > 1.0 and n_rows > 1


def context_rounds(strategy: str) -> int:
    """Exchange rounds of a ranked step's context: lengths only for
    ``length``; lengths, then points, for a registered strategy."""
    return 1 if strategy == "length" else 2


@dataclass(frozen=True)
class Sparsity:
    """One step's sparsity, as its tasks receive it: the factor, the
    strategy and seed, the source level's bin (the reference passes it to
    the strategies) and a registered strategy's function, resolved on the
    driver (:func:`selection_function`)."""

    factor: float
    strategy: str = "random"
    seed: int | None = None
    source_bin: tuple[float, ...] = ()
    select: Callable | None = None

    @classmethod
    def of_level(cls, lv, strategy: str, seed) -> "Sparsity":
        """The sparsity of a planned level (``LevelPlan``)."""
        return cls(float(lv.sparsity_factor), strategy, seed, tuple(lv.source_bin),
                   selection_function(strategy))

    def needs_context(self, n_rows: int) -> bool:
        """:func:`ranked`: per-object context comes before the survivors."""
        return ranked(self.strategy, self.factor, n_rows)

    @property
    def wants_points(self) -> bool:
        """The context includes midpoints (a registered strategy's)."""
        return self.strategy != "length"

    def kept(self, n_rows: int, *, lengths=None, points=None) -> np.ndarray:
        """:func:`kept_rows` with this sparsity."""
        return kept_rows(n_rows, self.factor, self.strategy, self.seed, self.source_bin,
                         lengths=lengths, points=points, select=self.select)


def kept_rows(n_rows: int, sparsity_factor: float, strategy: str, seed, base_bin, *,
              lengths: np.ndarray | None = None, points: np.ndarray | None = None,
              select=None) -> np.ndarray:
    """Survivors of sparsity as a row mask.

    ``random`` is the reference's seeded selection (same seed, same rows).
    ``length`` keeps the ``target_count`` rows of greatest polyline length,
    ties to the lower row.  Any other name is a strategy registered in
    zarr-vectors' registry, resolved on the driver (``select``, so workers
    need not have imported the package that registered it) and called with
    the reference's contract and the per-object context it documents."""
    keep = np.zeros(n_rows, dtype=bool)
    if not (sparsity_factor > 1.0 and n_rows > 1):
        keep[:] = True
        return keep
    if strategy == "random":
        from zarr_vectors.multiresolution.object_selection import apply_sparsity
        kept = apply_sparsity(n_rows, 1.0 / sparsity_factor, strategy, seed=seed,
                              representative_points=None, bin_shape=tuple(base_bin))
    elif strategy == "length":
        if lengths is None or lengths.shape != (n_rows,):
            raise ValueError(f"sparsity_strategy 'length' needs one length per row "
                             f"({n_rows}); got {None if lengths is None else lengths.shape}")
        # A stable sort of the negated lengths puts equal lengths in row order.
        kept = np.argsort(-np.asarray(lengths, dtype=np.float64),
                          kind="stable")[:target_count(n_rows, sparsity_factor)]
    else:
        if select is None:
            from zarr_vectors.multiresolution.registry import require_selection_strategy
            select = require_selection_strategy(strategy)
        kept = select(n_rows, target_count(n_rows, sparsity_factor), seed=seed,
                      lengths=lengths, attribute_values=None, attribute_mode="max",
                      representative_points=points, bin_shape=tuple(base_bin))
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        if kept.size and (kept.min() < 0 or kept.max() >= n_rows):
            raise ValueError(f"sparsity_strategy {strategy!r} returned row indices outside "
                             f"0..{n_rows - 1}")
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep


def selection_function(strategy: str):
    """A registered selection strategy, resolved where it was registered
    (the driver) and shipped in the graph: workers need not have imported
    the package that registers it.  None for the built-in strategies."""
    if strategy in BUILTIN_STRATEGIES:
        return None
    from zarr_vectors.multiresolution.registry import require_selection_strategy
    return require_selection_strategy(strategy)
