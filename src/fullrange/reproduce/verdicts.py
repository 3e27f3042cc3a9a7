"""Verdicts from distances to the data, over seeds.

Every claim is scored by how close the samples come to the data (a distance: W1 of per-image brightness,
``|spread ratio - 1|``, the gap to a target brightness), never by which number is larger: a recipe that
over-disperses is no better than one that compresses. A claim holds in a seed or it does not; the verdict says
in how many:

- **reproduced**: in every seed;
- **partly**: on average over the seeds (or in some seeds), not in every one;
- **not reproduced**: neither.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread_distance(spread_ratio: float) -> float:
    """How far a brightness spread ratio (samples / data) is from the data's own, 1.0."""
    return abs(spread_ratio - 1.0)


def closer(fixed: Sequence[float], base: Sequence[float], margin: float = 0.75) -> str:
    """Does ``fixed`` come closer to the data than ``base``? Both are distances to the data, one per seed (the
    same seeds, in order). Reproduced when it is closer in every seed and its mean distance is at most ``margin``
    times the base's (a clear gain, not noise); partly when its mean distance is lower."""
    _same_seeds(fixed, base)
    mean_fixed, mean_base = statistics.fmean(fixed), statistics.fmean(base)
    if all(f < b for f, b in zip(fixed, base, strict=True)) and mean_fixed <= margin * mean_base:
        return "reproduced"
    return "partly" if mean_fixed < mean_base else "not reproduced"


def holds(per_seed: Sequence[bool], on_average: bool | None = None) -> str:
    """A claim tested in each seed: reproduced if it holds in every one, partly if in some (or, when given,
    ``on_average``: it holds for the seeds' means), else not reproduced."""
    if per_seed and all(per_seed):
        return "reproduced"
    return "partly" if any(per_seed) or on_average else "not reproduced"


def interval(values: Sequence[float]) -> dict:
    """Mean and range of one figure over seeds: ``{"mean", "low", "high", "values"}``."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "low": min(values), "high": max(values), "values": values}


def fmt(values: Sequence[float] | dict, digits: int = 3) -> str:
    """``0.532 (0.513–0.548)``: the mean over seeds and their range; a single seed prints as its value."""
    iv = values if isinstance(values, dict) else interval(values)
    if len(iv["values"]) == 1:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} ({iv['low']:.{digits}f}–{iv['high']:.{digits}f})"


def _same_seeds(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"per-seed distances differ in length or are empty: {len(a)} and {len(b)}")
