"""Precision and recall next to nnU-Net's Dice in a ``summary.json``; overlap of two masks.

nnU-Net's ``compute_metrics_on_folder`` already stores TP, FP and FN per case and label; we derive
precision = TP / (TP + FP) and recall = TP / (TP + FN) (NaN when undefined, e.g. precision of an
empty prediction), average them over cases with ``nanmean`` like nnU-Net averages Dice, and
rewrite the file atomically.

The convention (``docs/benchmarks/README.md``): a mean of precision is over the cases with a
non-empty prediction, so a case the method misses entirely does not lower it; that is why every
mean comes with the number of empty predictions (:func:`count_empty_predictions`), and why DSC
and recall, which do count such a case as 0, stand next to it.
"""
from __future__ import annotations

import json
import math

import numpy as np

from nnunet_stseg.atomic import write_json_atomic

__all__ = ["add_precision_recall", "overlap", "hd95", "mean_sd", "count_empty_predictions"]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def mean_sd(values) -> tuple[float, float]:
    """Mean and standard deviation over the cases where a metric is defined (NaN skipped, no
    warning); (NaN, NaN) when it is defined nowhere.

    >>> mean_sd([0.5, float("nan"), 1.0])
    (0.75, 0.25)
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return (float(arr.mean()), float(arr.std())) if arr.size else (math.nan, math.nan)


def count_empty_predictions(precisions) -> int:
    """Cases whose prediction is empty: exactly those with an undefined (NaN) precision.

    >>> count_empty_predictions([0.9, float("nan"), 1.0])
    1
    """
    return int(np.isnan(np.asarray(precisions, dtype=float)).sum())


def overlap(pred: np.ndarray, gt: np.ndarray) -> dict:
    """DSC, IoU, precision, recall of two binary masks. Empty vs empty counts as a perfect 1 (every
    patient counts in a mean; nnU-Net's Dice is NaN there); precision and recall are NaN when
    undefined, as in :func:`add_precision_recall`.

    >>> overlap(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    {'Dice': 0.5, 'IoU': 0.3333333333333333, 'Precision': 0.5, 'Recall': 0.5}
    """
    tp, fp, fn = float((pred & gt).sum()), float((pred & ~gt).sum()), float((~pred & gt).sum())
    return {"Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
            "IoU": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
            "Precision": _ratio(tp, tp + fp), "Recall": _ratio(tp, tp + fn)}


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(mask.ndim, mask.ndim),
                                          border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """95th percentile of the symmetric surface distances (mm) between two binary masks with voxel
    ``spacing`` (one value per axis): the distances of every surface voxel of each mask to the
    other's surface, pooled. 0 when both are empty, NaN when only one is (undefined, left out of a
    mean as precision is).

    >>> a = np.zeros((1, 10, 10), bool); a[0, 2:5, 2:5] = True
    >>> b = np.zeros((1, 10, 10), bool); b[0, 2:5, 4:7] = True
    >>> hd95(a, b, (1.0, 1.0, 2.0)), hd95(a, a, (1, 1, 1)), hd95(a, np.zeros_like(a), (1, 1, 1))
    (4.0, 0.0, nan)
    """
    from scipy import ndimage

    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() and not gt.any():
        return 0.0
    if not pred.any() or not gt.any():
        return float("nan")
    sp, sg = _surface(pred), _surface(gt)
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def add_precision_recall(summary_file: str) -> dict:
    """Add ``Precision`` and ``Recall`` per case, per label mean and foreground mean, and
    ``n_empty_predictions`` (per label: cases without that label predicted; foreground mean: cases
    without any foreground predicted); returns the updated summary.

    >>> import json, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "summary.json")
    >>> case = {"TP": 3, "FP": 1, "FN": 0, "TN": 10, "Dice": 0.857}
    >>> summary = {"metric_per_case": [{"metrics": {"1": case}}], "mean": {"1": dict(case)}}
    >>> with open(path, "w") as f:
    ...     json.dump({**summary, "foreground_mean": dict(case)}, f)
    >>> fg = add_precision_recall(path)["foreground_mean"]
    >>> fg["Precision"], fg["n_empty_predictions"]
    (0.75, 0)
    """
    with open(summary_file) as f:
        summary = json.load(f)
    per_label: dict[str, dict[str, list[float]]] = {}
    for case in summary["metric_per_case"]:
        for label, m in case["metrics"].items():
            m["Precision"] = _ratio(m["TP"], m["TP"] + m["FP"])
            m["Recall"] = _ratio(m["TP"], m["TP"] + m["FN"])
            acc = per_label.setdefault(label, {"Precision": [], "Recall": []})
            acc["Precision"].append(m["Precision"])
            acc["Recall"].append(m["Recall"])
    for label, acc in per_label.items():
        for name, values in acc.items():
            summary["mean"][label][name] = mean_sd(values)[0]
        summary["mean"][label]["n_empty_predictions"] = count_empty_predictions(acc["Precision"])
    for name in ("Precision", "Recall"):
        summary["foreground_mean"][name] = mean_sd([summary["mean"][label][name] for label in per_label])[0]
    summary["foreground_mean"]["n_empty_predictions"] = sum(
        all(m["TP"] + m["FP"] == 0 for m in case["metrics"].values()) for case in summary["metric_per_case"])
    write_json_atomic(summary, summary_file)
    return summary
