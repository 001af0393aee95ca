"""How plans print shapes, sizes and counts."""

from __future__ import annotations

__all__ = ["fmt_tuple", "fmt_bytes", "fmt_count"]


def fmt_tuple(t) -> str:
    return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in t)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def fmt_count(x: float) -> str:
    return f"{int(round(x)):,}"
