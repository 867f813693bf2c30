"""Numbers as people read them in tables: one formatter for every percentage polyattn prints."""

from __future__ import annotations

__all__ = ["fmt_pct"]


def fmt_pct(v: float | None, digits: int = 1, sign: bool = True) -> str:
    """A fraction as a percentage (0.9632 -> "96.3%"; ``sign=False`` -> "96.3" for "(%)" columns); None as "-"."""
    if v is None:
        return "-"
    return f"{100 * v:.{digits}f}" + ("%" if sign else "")
