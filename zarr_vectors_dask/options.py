"""A build's choices beyond its store and factors, as one frozen object
that the build, resume and the records read (instead of each taking the
same seven keywords)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["BuildOptions"]


@dataclass(frozen=True)
class BuildOptions:
    """``build_pyramid``'s keywords of the same names, with its defaults."""

    sparsity_strategy: str = "random"
    sparsity_seed: int | None = None
    cross_level_depth: int = 1
    cross_level_storage: str = "explicit"
    max_block_vertices: int = 2_000_000
    vertex_attributes: str | None = None
    attribute_aggregation: dict | None = None

    def keywords(self) -> dict:
        """The options as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def strategy_record(self) -> dict:
        """What a level record keeps of them (``resume.level_record``)."""
        return {"sparsity_strategy": self.sparsity_strategy, "sparsity_seed": self.sparsity_seed,
                "cross_level_storage": self.cross_level_storage}
