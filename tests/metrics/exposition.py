"""Reading the Prometheus text exposition in tests (independent of prometheus_client)."""

from __future__ import annotations

import re

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, frozenset[tuple[str, str]]]


def samples(text: str) -> dict[Sample, float]:
    """``{(name, frozenset(labels)): value}`` of every sample line."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(text: str, metric: str, /, **labels: str) -> float | None:
    """The sample ``metric{labels}`` (exact label set), or None if absent."""
    return samples(text).get((metric, frozenset(labels.items())))


def names(text: str) -> set[str]:
    """Every sample name, and every family name from ``# TYPE`` lines."""
    out = {n for n, _ in samples(text)}
    out |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return out
