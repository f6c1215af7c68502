"""The object fingerprint: what objects the training labels hold, measured as the cascade defines
objects (connected components, full connectivity among the stage's active axes: 3D components for
a 3D stage, per-slice components for a 2D stage). nnU-Net fingerprints spacings, shapes and
intensities; the cascade's planner needs the objects' sizes too. Pure numpy / scipy.

One record per object, summaries per class, over all classes (``all``: the components of the
foreground union, what the cascade crops) and over those union components that are objects, not
specks (``objects``, :func:`objects_without_specks`: what the planner's rules read):

>>> seg = np.zeros((1, 20, 20), np.uint8); seg[0, 2:6, 2:4] = 1; seg[0, 10:20, 5:15] = 2
>>> recs = object_records(seg, [1.0, 0.5, 0.5], active=[False, True, True], classes=[1, 2])
>>> [(r["class"], r["extent_mm"], r["touches_border"]) for r in recs if r["class"] != "all"]
[('1', [1.0, 2.0, 1.0], False), ('2', [1.0, 5.0, 5.0], True)]
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from nnunet_stseg.core.geometry import connectivity_structure

__all__ = ["QUANTILES", "SPECK_FRACTION", "object_records", "objects_without_specks", "summarise_objects"]

QUANTILES = {"p1": 1, "p5": 5, "p50": 50, "p95": 95, "max": 100}
SPECK_FRACTION = 0.01  # a union component under 1 % of the median one's volume is a speck, not an object


def _components(mask: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]], np.ndarray]:
    labels, n = ndimage.label(mask, structure=connectivity_structure(active))
    slices = ndimage.find_objects(labels, max_label=n)
    voxels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, slices, voxels


def object_records(seg: np.ndarray, spacing: Sequence[float], active: Sequence[bool],
                   classes: Iterable[int], case: str = "") -> list[dict]:
    """Every object of one label array ``seg`` (3 axes, nnU-Net's transposed order; a 2D image is
    ``(1, H, W)``) with ``spacing`` (mm per axis). ``active`` says which axes connect voxels:
    all three for a 3D stage, the last two for a 2D stage (objects per slice). One record per
    component of each class in ``classes`` and of their union (class ``"all"``):

    - ``extent_mm`` / ``extent_voxels``: its bounding box per axis (inactive axes: one slice);
    - ``volume_mm3`` and ``voxels``; ``share``: voxels / voxels of the image (of its slice for a
      2D stage);
    - ``touches_border``: the box reaches the image's edge along an active axis.

    >>> seg = np.zeros((2, 8, 8), np.uint8); seg[:, 1:3, 1:5] = 1    # one 3D object, two slices
    >>> [(r["class"], r["extent_voxels"], r["voxels"]) for r in object_records(seg, [2, 1, 1], [True] * 3, [1])]
    [('1', [2, 2, 4], 16), ('all', [2, 2, 4], 16)]
    >>> len(object_records(seg, [2, 1, 1], [False, True, True], [1]))  # a 2D stage: one per slice and class
    4
    """
    seg = np.asarray(seg)
    if seg.ndim != 3 or len(spacing) != 3 or len(active) != 3:
        raise ValueError(f"a (Z, Y, X) label array with 3 spacings and 3 axis flags expected, got {seg.shape}, "
                         f"{list(spacing)}, {list(active)}")
    active = np.asarray(active, dtype=bool)
    spacing = np.asarray(spacing, dtype=float)
    image_voxels = float(np.prod([n for n, a in zip(seg.shape, active) if a]))
    voxel_mm3 = float(np.prod(spacing))
    out = []
    masks = [(str(c), seg == c) for c in classes] + [("all", seg > 0)]
    for name, mask in masks:
        if not mask.any():
            continue
        _, slices, voxels = _components(mask, active)
        for sl, n in zip(slices, voxels):
            extent = np.array([s.stop - s.start for s in sl])
            border = any(a and (s.start == 0 or s.stop == size) for s, size, a in zip(sl, seg.shape, active))
            out.append({"case": case, "class": name, "extent_voxels": extent.tolist(),
                        "extent_mm": [round(float(v), 4) for v in extent * spacing],
                        "voxels": int(n), "volume_mm3": round(float(n) * voxel_mm3, 4),
                        "share": round(float(n) / image_voxels, 6), "touches_border": bool(border)})
    return out


def objects_without_specks(records: Sequence[dict], fraction: float = SPECK_FRACTION) -> tuple[list[dict], int]:
    """The union components (class ``"all"``: what the cascade crops) that are objects, relabelled
    class ``"objects"``, and how many specks were left out: components whose volume is under
    ``fraction`` of the median union component's (label noise, a fragment of one stray voxel),
    which would otherwise decide every low quantile of a dataset with few objects per case.

    >>> recs = [{"class": "all", "volume_mm3": v} for v in (1000, 1200, 900, 2)]
    >>> kept, specks = objects_without_specks(recs)
    >>> [r["volume_mm3"] for r in kept], specks, kept[0]["class"]
    ([1000, 1200, 900], 1, 'objects')
    """
    union = [r for r in records if r["class"] == "all"]
    if not union:
        return [], 0
    floor = fraction * float(np.median([r["volume_mm3"] for r in union]))
    kept = [{**r, "class": "objects"} for r in union if r["volume_mm3"] >= floor]
    return kept, len(union) - len(kept)


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    values = np.asarray(values, dtype=float)
    return {k: round(float(np.percentile(values, q)), 4) for k, q in QUANTILES.items()} if len(values) else {}


def summarise_objects(records: Sequence[dict], cases: Sequence[str]) -> dict[str, dict]:
    """Per class (and ``"all"``): number of objects, objects per case (cases without one count as
    0), quantiles (``p1 p5 p50 p95 max``) of the extent per axis in mm, of the volume and of the
    share, and the fraction of objects touching the border.

    >>> recs = [{"case": "a", "class": "all", "extent_mm": [1, 4, 4], "volume_mm3": 16, "share": 0.1,
    ...          "touches_border": False}]
    >>> s = summarise_objects(recs, ["a", "b"])["all"]
    >>> s["objects"], s["objects_per_case"]["max"], s["extent_mm"][1]["p50"]
    (1, 1.0, 4.0)
    """
    out: dict[str, dict] = {}
    for name in sorted({r["class"] for r in records}, key=lambda c: (c in ("all", "objects"), c)):
        mine = [r for r in records if r["class"] == name]
        per_case = [sum(r["case"] == c for r in mine) for c in cases]
        extents = np.asarray([r["extent_mm"] for r in mine], dtype=float)
        out[name] = {"objects": len(mine), "objects_per_case": _quantiles(per_case),
                     "extent_mm": [_quantiles(extents[:, a]) for a in range(extents.shape[1])],
                     "volume_mm3": _quantiles([r["volume_mm3"] for r in mine]),
                     "share": _quantiles([r["share"] for r in mine]),
                     "touching_border": round(float(np.mean([r["touches_border"] for r in mine])), 4)}
    return out
