"""When to stop training: the validation plateau rule (the object-size paper trains "until the
validation loss stops improving", then "until the validation size error stops improving"). Pure
Python; the trainers' adapter is ``_StSScheduleMixin`` (``STSEG_PATIENCE``)."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["best_epoch", "plateau_reached"]


def best_epoch(values: Sequence[float], min_delta: float = 0.0) -> int | None:
    """Index of the best (lowest) value, where a value counts as better only when it is lower than
    the best so far by more than ``min_delta``; NaN never improves. None when nothing is finite.

    >>> best_epoch([3.0, 2.0, 2.5, 1.99], min_delta=0.05)   # 1.99 is not better by more than 0.05
    1
    """
    best, where = math.inf, None
    for i, v in enumerate(values):
        if v is not None and not math.isnan(v) and v < best - (min_delta if where is not None else 0.0):
            best, where = v, i
    return where


def plateau_reached(values: Sequence[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when the last ``patience`` values brought no improvement over the best before them:
    ``len(values) - 1 - best_epoch(values) >= patience`` (also when no value is finite and at least
    ``patience`` values exist).

    >>> plateau_reached([1.0, 0.8, 0.9, 0.85], patience=2), plateau_reached([1.0, 0.8, 0.9], patience=2)
    (True, False)
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1 epoch, got {patience}")
    where = best_epoch(values, min_delta)
    return len(values) - 1 - (where if where is not None else -1) >= patience
