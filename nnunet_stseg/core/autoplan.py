"""The self-configuring cascade's rules: from the object fingerprint
(:mod:`nnunet_stseg.core.fingerprint`) and nnU-Net's full-resolution plan to the coarse grid, S, the
size rule and ``max_crops``, each with the numbers behind it (docs/design.md "Self-configuring
cascade"). Pure functions; the planner (``planners/sts_planner.py``) applies them.

A choice is a :class:`Choice`: the value and one line saying why, which the planner logs and writes
into the plans next to the values the user gave.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["AutoPlanRules", "Choice", "object_voxels", "coarse_grid", "input_size", "size_rule", "max_crops", "cascade_cannot_help"]


@dataclass(frozen=True)
class AutoPlanRules:
    """The constants of the rules (why each value: docs/design.md "Self-configuring cascade").

    - ``small_quantile`` / ``coarse_voxels``: the coarse grid keeps the dataset's small objects
      (this quantile of the extent per axis of the objects the cascade crops: foreground union
      components, specks left out) at least this many coarse voxels wide. 10 = 2 + 1 / the crop's
      default ``margin_fraction`` 0.125: a coarse mask one voxel short on both sides of a small
      object still gives a crop whose margin reaches the object's edges; chosen on the training
      labels of five datasets (``benchmarks.coarse_grid_sweep``). The planner uses
      :func:`object_voxels` of the margin when the margin is set otherwise.
    - ``min_coarse_voxels``: no axis of the median coarse image gets fewer voxels than this.
    - ``typical_quantile`` / ``s_candidates``: S is the smallest candidate that holds the typical
      object's crop (this quantile of the crop extents) without downsampling it.
    - ``size_rule_fraction`` / ``size_rule_max``: the size rule drops coarse components narrower
      than this fraction of the smallest training object (p1), at most the paper's 5 voxels.
    - ``crops_margin`` / ``crop_memory_mb``: ``max_crops`` holds the most objects a training case
      has, times this margin, within this much float32 memory of resampled crops and K channels.
    - ``cannot_help_fraction``: objects whose median extent is at least this fraction of the median
      image on every active axis leave the cascade nothing to gain (one line says so).
    """

    small_quantile: str = "p5"
    coarse_voxels: float = 10.0
    min_coarse_voxels: int = 8
    typical_quantile: str = "p50"
    s_candidates: tuple[int, ...] = (32, 48, 64, 96, 128, 160, 192, 256)
    size_rule_fraction: float = 0.5
    size_rule_max: float = 5.0
    crops_margin: float = 1.25
    crop_memory_mb: float = 2048.0
    cannot_help_fraction: float = 0.5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["s_candidates"] = list(self.s_candidates)
        return d


def object_voxels(margin_fraction: float) -> float:
    """Coarse voxels k a small object must span so that a coarse mask one voxel short on both sides
    still gives a crop that holds it: the crop adds ``margin_fraction`` of the (shortened) box on
    each side, margin_fraction x (k - 2) >= 1, so k = 2 + 1 / margin_fraction, within 4..18.

    >>> object_voxels(0.125), object_voxels(0.05), object_voxels(0.25), object_voxels(1.0)
    (10.0, 18.0, 6.0, 4.0)
    """
    return 18.0 if margin_fraction <= 0 else float(min(18.0, max(4.0, 2.0 + 1.0 / margin_fraction)))


class Choice(NamedTuple):
    value: object
    why: str


def coarse_grid(spacing: Sequence[float], median_shape: Sequence[float], small_extent_mm: Sequence[float],
                active: Sequence[bool], rules: AutoPlanRules = AutoPlanRules()) -> tuple[list[float], list[int], Choice]:
    """The coarse grid: per active axis the largest downsampling factor that keeps a small object
    (``small_extent_mm``) ``rules.coarse_voxels`` coarse voxels wide and the median image at least
    ``rules.min_coarse_voxels`` voxels long; never upsampled (factor >= 1); inactive axes kept; axes
    of one spacing share the smallest of their objects' bounds (a square in-plane grid stays square).
    Returns (coarse spacing, coarse median shape, Choice(factors, why)).

    >>> sp, shape, why = coarse_grid([3.0, 0.7, 0.7], [100, 512, 512], [3.0, 14.0, 14.0], [True] * 3)
    >>> sp, shape, why.value   # 14 mm / 10 voxels = 1.4 mm in-plane (factor 2); z stays at 3 mm
    ([3.0, 1.4, 1.4], [100, 256, 256], [1.0, 2.0, 2.0])
    """
    spacing = np.asarray(spacing, dtype=float)
    median = np.asarray(median_shape, dtype=float)
    small = np.asarray(small_extent_mm, dtype=float)
    by_objects = np.where(np.isfinite(small), small / (rules.coarse_voxels * spacing), np.inf)
    # axes of one spacing share the objects' bound (an in-plane grid stays square); each keeps its image bound
    shared = [min(by_objects[b] for b in range(len(spacing)) if active[b]
                  and abs(spacing[b] - spacing[a]) <= 0.01 * spacing[a]) if active[a] else 1.0
              for a in range(len(spacing))]
    factors = [1.0 if not active[a] or not np.isfinite(shared[a])
               else float(max(1.0, min(shared[a], median[a] / rules.min_coarse_voxels))) for a in range(len(spacing))]
    factors_arr = np.round(np.asarray(factors), 3)
    c_spacing = [float(v) for v in spacing * factors_arr]
    c_shape = [int(max(1, round(m / f))) for m, f in zip(median, factors_arr)]
    why = (f"the {rules.small_quantile} object extent per axis ({', '.join(_mm(v) for v in small)}) stays "
           f">= {rules.coarse_voxels:g} coarse voxels: downsampling x {', '.join(f'{f:g}' for f in factors_arr)} "
           f"(coarse spacing {', '.join(_mm(v) for v in c_spacing)}, median coarse image "
           f"{' x '.join(str(s) for s in c_shape)})")
    return c_spacing, c_shape, Choice([float(f) for f in factors_arr], why)


def _mm(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:g} mm"


def crop_extent_voxels(extent_mm: Sequence[float], spacing: Sequence[float], active: Sequence[bool],
                       margin_fraction: float, margin_min: float) -> float:
    """Side (voxels of the finest active axis) of the squared, padded crop of an object with this
    extent: the largest active extent in mm, plus ``margin_fraction`` of it on each side, at least
    ``margin_min`` voxels on each side (the crop rule of :class:`~nnunet_stseg.core.geometry.CropParams`).

    >>> crop_extent_voxels([1.0, 20.0, 10.0], [1.0, 0.5, 0.5], [False, True, True], 0.125, 4.0)
    50.0
    """
    finest = min(float(s) for s, a in zip(spacing, active) if a)
    side = max(float(e) for e, a in zip(extent_mm, active) if a) / finest
    return side + 2 * max(margin_fraction * side, margin_min)


def input_size(typical_extent_mm: Sequence[float], spacing: Sequence[float], active: Sequence[bool],
               margin_fraction: float, margin_min: float, largest_allowed: int | None = None,
               rules: AutoPlanRules = AutoPlanRules(), image_voxels: float | None = None) -> Choice:
    """S: the smallest candidate that holds the typical object's crop at full resolution (no
    downsampling of a typical object), at most ``largest_allowed`` (the largest S nnU-Net keeps as
    the fine patch within its memory target). A crop never exceeds the image, so the crop counted
    is at most ``image_voxels`` (the median image's longest active side, finest-axis voxels).

    >>> input_size([1.0, 20.0, 10.0], [1.0, 0.5, 0.5], [False, True, True], 0.125, 4.0).value  # 50 voxels
    64
    >>> input_size([1.0, 200.0, 10.0], [1.0, 0.5, 0.5], [False, True, True], 0.125, 4.0, 128).value
    128
    >>> input_size([1.0, 200.0, 10.0], [1.0, 0.5, 0.5], [False, True, True], 0.125, 4.0, image_voxels=60).value
    64
    """
    crop = crop_extent_voxels(typical_extent_mm, spacing, active, margin_fraction, margin_min)
    if image_voxels is not None:
        crop = min(crop, float(image_voxels))
    allowed = [s for s in rules.s_candidates if largest_allowed is None or s <= largest_allowed]
    if not allowed:
        raise ValueError(f"no S candidate {list(rules.s_candidates)} is at most {largest_allowed}")
    fitting = [s for s in allowed if s >= crop]
    s = fitting[0] if fitting else allowed[-1]
    why = (f"the {rules.typical_quantile} object's crop is {crop:.0f} voxels of the full-resolution grid: "
           + (f"S = {s}, the smallest of {allowed} that holds it without downsampling" if fitting else
              f"S = {s}, the largest nnU-Net keeps as the fine patch (crops of typical objects are downsampled "
              f"{crop / s:.1f} x)"))
    return Choice(int(s), why)


def size_rule(smallest_extent_voxels: float, rules: AutoPlanRules = AutoPlanRules()) -> Choice:
    """``min_object_size`` (voxels of the finest axis of the full-resolution grid): a fraction of the
    smallest training object's extent (its p1 smallest active axis), so no object the dataset holds
    is dropped as noise, at most the paper's 5 voxels, at least 1.

    >>> size_rule(40.0).value, size_rule(4.0).value, size_rule(1.0).value
    (5.0, 2.0, 1.0)
    """
    value = float(min(rules.size_rule_max, max(1.0, math.floor(rules.size_rule_fraction * smallest_extent_voxels + 1e-6))))
    why = (f"the smallest training objects (p1) are {smallest_extent_voxels:.1f} voxels across: coarse components "
           f"narrower than {value:g} voxels are dropped as noise (at most the paper's {rules.size_rule_max:g})")
    return Choice(value, why)


def max_crops(most_objects_per_case: float, s: int, dims: int, channels: int,
              rules: AutoPlanRules = AutoPlanRules()) -> Choice:
    """Crops processed at once: the most objects a training case holds times ``crops_margin``,
    within ``crop_memory_mb`` of float32 crops (``channels`` input + output channels of S^dims).

    >>> max_crops(3, 64, 3, 3).value, max_crops(300, 64, 3, 3).value, max_crops(3000, 64, 3, 3).value
    (8, 375, 682)
    """
    by_memory = max(1, int(rules.crop_memory_mb * 2 ** 20 // (4 * channels * s ** dims)))
    wanted = max(8, int(math.ceil(rules.crops_margin * most_objects_per_case)))
    value = min(wanted, by_memory)
    why = (f"training cases hold up to {most_objects_per_case:g} objects: {value} crops at once"
           + (f" (memory bound of {rules.crop_memory_mb:g} MB)" if value < wanted else ""))
    return Choice(int(value), why)


def cascade_cannot_help(median_extent_mm: Sequence[float], median_image_mm: Sequence[float], active: Sequence[bool],
                        rules: AutoPlanRules = AutoPlanRules()) -> str | None:
    """One plain line when the median object spans at least ``cannot_help_fraction`` of the median
    image on every active axis (a crop is then about the image: the cascade segments the image twice),
    else None.

    >>> cascade_cannot_help([1, 150, 150], [1, 200, 200], [False, True, True]) is not None
    True
    """
    shares = [float(e) / float(i) for e, i, a in zip(median_extent_mm, median_image_mm, active) if a and i > 0]
    if shares and min(shares) >= rules.cannot_help_fraction:
        return (f"the median object spans {min(shares):.0%} or more of the image on every axis: a crop is about the "
                f"whole image, so the cascade cannot gain over nnU-Net's own configuration; use nnU-Net's "
                f"2d / 3d_fullres for this dataset")
    return None
