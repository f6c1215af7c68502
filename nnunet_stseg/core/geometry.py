"""Segment-then-segment geometry: boxes, crops, resampling and fusion.

Pure functions with no nnU-Net imports. Boxes live on the host as small integer arrays
(N, ndim, 2) holding ``[start, stop)`` per axis in voxels of the full-resolution grid; images,
crops and probabilities are torch tensors on any device (numpy arrays are accepted and returned
as numpy where noted).

Axes whose fine patch size is 1 are *inactive*: they are never squared, padded, jittered or
resampled, and connected components do not connect along them. That is how a 2D fine stage runs
on a 3D volume slice by slice with the same code as the 3D stage (patch ``(1, S, S)``).

One sampling convention is used everywhere (half-pixel centres, ``align_corners=False``): output
index ``j`` of ``n`` samples on a box ``[a, b)`` reads source coordinate
``a + (j + 0.5) * (b - a) / n - 0.5``. Pasting back uses the exact inverse mapping, so nearest
neighbour crop -> paste reproduces every voxel of a box that is not larger than the patch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass(frozen=True)
class CropParams:
    """How boxes around objects become fine-stage crops. Lengths are in voxels of the finest
    active axis of the full-resolution grid, converted per axis through the spacing, so the same
    numbers serve isotropic and anisotropic data.

    - ``patch_size``: fine network input per axis (1 = inactive axis, see module docstring).
    - ``margin_fraction``: context added on every side, relative to the squared box side.
    - ``margin_min``: lower bound of that context (small objects still get some).
    - ``min_object_size``: components narrower than this many voxels of the finest axis are
      dropped at inference before padding (the paper's 5-pixel rule), along the finest axes only
      (see :func:`size_thresholds`).
    - ``size_rule_grid``: the grid those voxels are counted on: ``full`` (default: the paper's
      rule, voxels of the full-resolution grid the boxes are cut from) or ``coarse`` (voxels of
      the coarse model's grid, where a one-voxel speck of the coarse mask is what noise looks like;
      stricter by the downsampling factor).
    - ``jitter_image_fraction`` / ``jitter_box_fraction``: training-time uniform jitter of box
      centre and size per active axis, ``min(f_img * image_extent, f_box * box_side)`` voxels
      (the paper's +-16 px at 256 px is f_img = 1/16; the box bound stops the jitter from
      swamping small objects on large images: the object's centre always stays in its crop,
      its edges may be cut, which is the coarse-mask error the fine network must tolerate).
    - ``square``: make boxes square/cubic in physical units (mm), not in voxels.
    - ``proposal_threshold``: recall-first proposals: besides the coarse argmax
      components, components of ``foreground probability >= proposal_threshold`` that hold no
      argmax voxel become proposals too (at most ``max_crops`` more per case, the most probable
      first); None = argmax components only (the published method). In (0, 0.5].
    - ``proposal_confirmation``: the fine stage confirms a proposal below the decision (0.8.6): its
      crop is fused only when the fine network's mean foreground probability over the voxels it
      labels foreground (:func:`segmented_confidence`) is at least this value; a rejected
      proposal keeps the coarse probabilities (background: it holds no argmax voxel). Objects the
      coarse argmax found are always fused. None = every proposal fused. In [0.5, 1).
    - ``negative_fraction``: training only: this fraction of the fine stage's crops is drawn where
      the label has no foreground (sized like the case's object crops, smaller where none fits), so
      the fine network learns to return nothing for a false proposal; 0 = crops around objects only
      (the published method).

    All three default to the published method (None, None, 0): none of them raised the validation
    DSC on Kvasir-SEG consistently (docs/benchmarks/kvasir_recall.md); plans without the keys
    (made before 0.3, or 0.8.6 for ``proposal_confirmation``) get the same.
    """

    patch_size: tuple[int, ...]
    margin_fraction: float = 0.125
    margin_min: float = 4.0
    min_object_size: float = 5.0
    jitter_image_fraction: float = 0.0625
    jitter_box_fraction: float = 0.25
    square: bool = True
    size_rule_grid: str = "full"
    proposal_threshold: float | None = None
    proposal_confirmation: float | None = None
    negative_fraction: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if any(p < 1 for p in self.patch_size) or not any(p > 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be >= 1 per axis with at least one axis > 1, got {self.patch_size}")
        for name in ("margin_fraction", "margin_min", "min_object_size", "jitter_image_fraction",
                     "jitter_box_fraction"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.size_rule_grid not in ("full", "coarse"):
            raise ValueError(f"size_rule_grid must be 'full' or 'coarse', got {self.size_rule_grid!r}")
        if self.proposal_threshold is not None and not 0 < self.proposal_threshold <= 0.5:
            raise ValueError(f"proposal_threshold must be in (0, 0.5] or None (argmax components only), got "
                             f"{self.proposal_threshold}")
        if self.proposal_confirmation is not None and not 0.5 <= self.proposal_confirmation < 1:
            raise ValueError(f"proposal_confirmation must be in [0.5, 1) or None (every proposal fused), got "
                             f"{self.proposal_confirmation}")
        if not 0 <= self.negative_fraction < 1:
            raise ValueError(f"negative_fraction must be in [0, 1), got {self.negative_fraction}")

    @property
    def active(self) -> np.ndarray:
        return np.array([p > 1 for p in self.patch_size])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CropParams":
        d = checked_fields(cls, d, "crop")
        if "patch_size" not in d:
            raise ValueError("crop parameters need 'patch_size'")
        return cls(**d)


def checked_fields(cls, d: dict, what: str) -> dict:
    """``d`` if all its keys are fields of the dataclass ``cls``, else a clear error naming the
    unknown ones (a typo in a plans file must not be ignored silently).

    >>> checked_fields(CropParams, {"margin_min": 2}, "crop")
    {'margin_min': 2}
    >>> checked_fields(CropParams, {"margin": 2}, "crop")
    Traceback (most recent call last):
    ...
    ValueError: unknown crop parameters ['margin']; known: ['jitter_box_fraction', ...]
    """
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} parameters {sorted(unknown)}; known: {sorted(known)}")
    return dict(d)


# ----------------------------------------------------------------------------------------------
# boxes (host, numpy)
# ----------------------------------------------------------------------------------------------

def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def label_foreground(labels, ignore_label: int | None = None):
    """Foreground of a label map (numpy or torch, any shape): label > 0 and not the ignore label
    (nnU-Net's ``ignore`` label marks unannotated voxels, neither object nor background).

    >>> label_foreground(np.array([0, 1, 2, 3]), ignore_label=3)
    array([False,  True,  True, False])
    """
    fg = labels > 0
    if ignore_label is not None:
        fg &= labels != ignore_label
    return fg


def connectivity_structure(active: Sequence[bool]) -> np.ndarray:
    """Full (8/26-) connectivity among active axes and none along inactive ones.

    >>> s = connectivity_structure([False, True, True])  # a 2D stage on (Z, Y, X): no link across slices
    >>> s.shape, int(s.sum()), bool(s[0].any())
    ((3, 3, 3), 9, False)
    """
    active = np.asarray(active, dtype=bool)
    ndim = len(active)
    structure = ndimage.generate_binary_structure(ndim, ndim)
    offsets = np.indices((3,) * ndim) - 1
    for ax in np.flatnonzero(~active):
        structure &= offsets[ax] == 0
    return structure


def component_boxes(mask, active: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a binary mask and their bounding boxes.

    Returns ``(labels, boxes)``: the label image (0 = background, component i has label i + 1)
    and an int64 array (N, ndim, 2) of ``[start, stop)`` per axis.

    >>> mask = np.zeros((1, 6, 8), bool); mask[0, 1:3, 1:4] = True; mask[0, 4:6, 6] = True
    >>> labels, boxes = component_boxes(mask, [False, True, True])
    >>> boxes.tolist()  # (N, ndim, [start, stop))
    [[[0, 1], [1, 3], [1, 4]], [[0, 1], [4, 6], [6, 7]]]
    """
    mask = _as_numpy(mask).astype(bool)
    if mask.ndim != len(active):
        raise ValueError(f"mask has {mask.ndim} axes but {len(active)} axis flags were given")
    labels, n = ndimage.label(mask, structure=connectivity_structure(active))
    slices = ndimage.find_objects(labels, max_label=n)
    boxes = np.array([[[s.start, s.stop] for s in sl] for sl in slices], dtype=np.int64).reshape(n, mask.ndim, 2)
    return labels, boxes


def _min_active_spacing(spacing: np.ndarray, active: np.ndarray) -> float:
    return float(np.min(spacing[active]))


def size_thresholds(rule_spacing: Sequence[float], active: Sequence[bool], min_object_size: float) -> np.ndarray:
    """Per-axis minimum extent (mm) of a component that is kept as an object (the paper's 5-pixel
    rule against noise in the coarse mask), defined on the grid the coarse mask was predicted on
    (``rule_spacing``): ``min_object_size`` voxels of its finest active axis along every active
    axis about that fine (within 1 %), nothing along coarser active axes, where a real object can be
    one voxel thin (a lesion on a single 3 mm slice of a 0.7 x 0.7 x 3 mm scan), and nothing along
    inactive axes.

    >>> size_thresholds([3.0, 0.7, 0.7], [True, True, True], 5).round(2).tolist()
    [0.0, 3.5, 3.5]
    >>> size_thresholds([1.0, 1.0, 1.0], [True, True, True], 5).tolist()  # isotropic: every axis
    [5.0, 5.0, 5.0]
    """
    sp = np.asarray(rule_spacing, dtype=float)
    active = np.asarray(active, dtype=bool)
    finest = float(sp[active].min())
    return np.where(active & (sp <= finest * 1.01), float(min_object_size) * finest, 0.0)


def keep_large_enough(boxes: np.ndarray, spacing: Sequence[float], params: CropParams,
                      rule_spacing: Sequence[float] | None = None) -> np.ndarray:
    """Boolean mask of boxes (voxels of the grid with ``spacing``) that pass the size rule of
    :func:`size_thresholds` on the grid with ``rule_spacing`` (the coarse model's grid; default
    ``spacing``): in mm, so a component of the upsampled coarse mask is judged in coarse voxels,
    where the rule means something. Applied before padding so that it can fire at all (the
    reference code tested after padding).

    >>> params = CropParams(patch_size=(1, 32, 32), min_object_size=5)
    >>> boxes = np.array([[[0, 1], [0, 10], [0, 6]], [[0, 1], [0, 3], [0, 20]]])
    >>> keep_large_enough(boxes, [1.0, 1.0, 1.0], params)  # the second is 3 px high
    array([ True, False])
    >>> keep_large_enough(boxes, [1.0, 1.0, 1.0], params, rule_spacing=[1.0, 4.0, 4.0])  # 5 coarse px = 20 px
    array([False, False])
    """
    spacing = np.asarray(spacing, dtype=float)
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    extent_mm = (boxes[:, :, 1] - boxes[:, :, 0]) * spacing[None]
    threshold = size_thresholds(spacing if rule_spacing is None else rule_spacing, params.active,
                                params.min_object_size)
    return np.all(extent_mm >= threshold[None] - 1e-6, axis=1)


def square_and_pad(boxes: np.ndarray, spacing: Sequence[float], params: CropParams) -> tuple[np.ndarray, np.ndarray]:
    """Centres and sizes (float voxels, (N, ndim)) of boxes squared in physical units along the
    active axes and padded by the context margin. Inactive axes keep the box's own extent.

    >>> params = CropParams(patch_size=(1, 32, 32), margin_fraction=0.125, margin_min=4)
    >>> centre, size = square_and_pad(np.array([[[0, 1], [10, 30], [10, 20]]]), [3.0, 0.5, 0.5], params)
    >>> centre.tolist(), size.tolist()  # 10 x 5 mm: squared to 10 mm, + max(12.5 %, 4 px) per side = 14 mm
    ([[0.5, 20.0, 15.0]], [[1.0, 28.0, 28.0]])
    """
    spacing = np.asarray(spacing, dtype=float)
    active = params.active
    boxes = np.asarray(boxes, dtype=float).reshape(-1, len(spacing), 2)
    centre = boxes.mean(axis=2)
    size = boxes[:, :, 1] - boxes[:, :, 0]
    if len(boxes) == 0:
        return centre, size
    size_mm = size * spacing[None]
    if params.square:
        side_mm = size_mm[:, active].max(axis=1, keepdims=True)
        size_mm = np.where(active[None], side_mm, size_mm)
    min_sp = _min_active_spacing(spacing, active)
    side_for_margin = size_mm[:, active].max(axis=1, keepdims=True)
    margin_mm = np.maximum(params.margin_fraction * side_for_margin, params.margin_min * min_sp)
    size_mm = np.where(active[None], size_mm + 2 * margin_mm, size_mm)
    return centre, size_mm / spacing[None]


def jitter(centre: np.ndarray, size: np.ndarray, image_shape: Sequence[int], params: CropParams,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random integer jitter of centre and size along active axes (training only).

    Amplitude per axis: ``min(jitter_image_fraction * image_extent, jitter_box_fraction * size)``,
    floored to whole voxels. Sizes stay >= 1 voxel.

    >>> params = CropParams(patch_size=(1, 32, 32))
    >>> c, s = jitter(np.array([[0.5, 50.0, 50.0]]), np.array([[1.0, 40.0, 40.0]]), (1, 256, 256), params,
    ...               np.random.default_rng(0))
    >>> bool(abs(c[0, 1] - 50) <= 10 and abs(s[0, 1] - 40) <= 10), float(c[0, 0]), float(s[0, 0])  # z untouched
    (True, 0.5, 1.0)
    """
    image_shape = np.asarray(image_shape, dtype=float)
    amp = np.floor(np.minimum(params.jitter_image_fraction * image_shape[None], params.jitter_box_fraction * size))
    amp = np.where(params.active[None], amp, 0).astype(np.int64)
    d_centre = rng.integers(-amp, amp + 1)
    d_size = rng.integers(-amp, amp + 1)
    return centre + d_centre, np.maximum(size + d_size, 1.0)


def fit_to_image(centre: np.ndarray, size: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Integer boxes (N, ndim, 2) of the requested size, shifted (size kept) to lie inside the
    image; a box larger than the image along an axis is clamped to the whole axis. Never drops a
    box (the reference code discarded boxes larger than the image, losing the object).

    >>> fit_to_image(np.array([[2.0, 30.0]]), np.array([[8.0, 8.0]]), (40, 32)).tolist()  # shifted inside, size kept
    [[[0, 8], [24, 32]]]
    """
    image_shape = np.asarray(image_shape, dtype=np.int64)
    size_i = np.maximum(np.rint(size).astype(np.int64), 1)
    size_i = np.minimum(size_i, image_shape[None])
    start = np.rint(centre - size_i / 2.0).astype(np.int64)
    start = np.clip(start, 0, image_shape[None] - size_i)
    return np.stack([start, start + size_i], axis=-1)


class FoundObjects(NamedTuple):
    """What :func:`find_objects` found: the component label image (0 = background), the kept
    components' label values (N,) and tight boxes (N, ndim, 2), their crop boxes (N, ndim, 2:
    squared, padded, fitted to the image), how many components the size rule dropped, and those
    components' label values (M,) with boxes (M, ndim, 2) on the full grid that hold their foreground;
    with ``decided`` given, ``below`` (N,): the kept components that hold no decided cell (recall-first
    proposals below the coarse decision)."""

    labels: np.ndarray
    ids: np.ndarray
    tight_boxes: np.ndarray
    crop_boxes: np.ndarray
    n_dropped: int
    dropped_ids: np.ndarray | None = None
    dropped_boxes: np.ndarray | None = None
    below: np.ndarray | None = None


def boxes_on_grid(boxes: np.ndarray, from_shape: Sequence[int], to_shape: Sequence[int],
                  pad_cells: float = 0.0) -> np.ndarray:
    """Integer boxes (N, ndim, 2) of one grid as integer boxes of another grid covering the same
    field of view (a coarse grid and the full-resolution grid of one image), rounded outward: the
    full-resolution voxels the coarse cells cover, widened by ``pad_cells`` cells on both sides along
    every axis whose size changes (clipped to the image).

    >>> boxes_on_grid(np.array([[[0, 1], [2, 5]]]), (1, 8), (1, 20)).tolist()  # x 2.5 along the second axis
    [[[0, 1], [5, 13]]]
    >>> boxes_on_grid(np.array([[[0, 1], [2, 5]]]), (1, 8), (1, 20), pad_cells=0.5).tolist()
    [[[0, 1], [3, 14]]]
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, len(from_shape), 2)
    to = np.asarray(to_shape, dtype=np.int64)
    f = to / np.asarray(from_shape, dtype=float)
    pad = np.where(to != np.asarray(from_shape), float(pad_cells), 0.0)[None]
    start = np.floor((boxes[:, :, 0] - pad) * f[None] + 1e-6).astype(np.int64)
    stop = np.ceil((boxes[:, :, 1] + pad) * f[None] - 1e-6).astype(np.int64)
    start = np.clip(start, 0, to[None] - 1)
    return np.stack([start, np.clip(np.maximum(stop, start + 1), 1, to[None])], axis=-1)


def support_labels(labels: np.ndarray, box: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """For every voxel of ``box`` (ndim, 2) on the full grid ``image_shape``, the label of ``labels``
    (a component label map on a coarser grid of the same field of view) among the coarse cells its
    linearly interpolated value is made of (0 if none holds a component). Where upsampled
    probabilities say foreground, one of those cells is foreground (a convex blend of background
    cells stays background), and the foreground cells of one voxel's support touch each other, so
    they hold ONE component: this is the component the voxel's foreground comes from.

    >>> support_labels(np.array([[[0, 1, 0, 2]]]), np.array([[0, 1], [0, 1], [0, 8]]), (1, 1, 8)).tolist()
    [[[0, 1, 1, 1, 1, 2, 2, 2]]]
    """
    grid = labels.shape
    axes = []
    for d, (n, g) in enumerate(zip(image_shape, grid)):
        u = np.arange(int(box[d][0]), int(box[d][1]))
        src = np.maximum((u + 0.5) * g / n - 0.5, 0.0)  # F.interpolate's source index (align_corners=False)
        lo = np.minimum(np.floor(src).astype(np.int64), g - 1)
        hi = np.where(src - np.floor(src) > 1e-9, np.minimum(lo + 1, g - 1), lo)  # only cells with weight
        axes.append((lo, hi))
    # The largest label over all 2^ndim corners is the largest over each axis in turn (separable):
    # gathers that grow one axis at a time, only the last one at the box's full size.
    out = labels
    for d in reversed(range(len(grid))):
        lo, hi = axes[d]
        gathered = np.take(out, lo, axis=d)
        if not np.array_equal(lo, hi):
            np.maximum(gathered, np.take(out, hi, axis=d), out=gathered)
        out = gathered
    return out


def component_voxels(probs: torch.Tensor, labels: np.ndarray, component: int, box: np.ndarray,
                     multilabel: bool, threshold: float | None = None) -> np.ndarray:
    """Bool mask of ``box`` (ndim, 2) on the full grid of ``probs`` (K, *shape: coarse probabilities
    linearly upsampled): the voxels whose upsampled values say foreground and whose foreground comes
    from the coarse component ``component`` of ``labels`` (:func:`support_labels`): that component's
    part of the full-grid mask, read only inside the box. "Foreground" is nnU-Net's decision
    (:func:`foreground_from_probabilities`), or with ``threshold`` a foreground probability of at
    least that (:func:`foreground_probability`: a recall-first proposal below the decision).

    >>> coarse = torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]], [[[1.0, 0.0, 0.0, 1.0]]]])  # (K, 1, 1, 4): 2 objects
    >>> canvas = upsample_probabilities(coarse, (1, 1, 8))
    >>> labels = np.array([[[1, 0, 0, 2]]])
    >>> component_voxels(canvas, labels, 2, np.array([[0, 1], [0, 1], [0, 8]]), False).astype(int).tolist()
    [[[0, 0, 0, 0, 0, 0, 1, 1]]]
    """
    region = probs[(slice(None), *_box_slices(box))]
    if threshold is None:
        foreground = foreground_from_probabilities(region, multilabel)
    else:
        foreground = foreground_probability(region, multilabel) >= threshold
    return foreground.cpu().numpy() & (support_labels(labels, box, probs.shape[1:]) == component)


def foreground_extents(probs: torch.Tensor, labels: np.ndarray, boxes: np.ndarray, multilabel: bool,
                       thresholds: Sequence[float | None] | None = None) -> np.ndarray:
    """Tight boxes (N, ndim, 2) on the full grid of ``probs`` (K, *shape) of the foreground of the
    coarse components 1..N of ``labels`` (:func:`component_voxels`, component i at ``thresholds[i]``:
    None = nnU-Net's decision), component i looked for inside ``boxes[i]`` (ndim, 2); a component
    without any such voxel gets an empty extent (start = stop).

    >>> probs = torch.tensor([[[[1.0, 0.2, 0.3, 1.0, 0.4, 1.0]]], [[[0.0, 0.8, 0.7, 0.0, 0.6, 0.0]]]])
    >>> labels = np.array([[[0, 1, 1, 0, 2, 0]]])            # already on the full grid here
    >>> boxes = np.array([[[0, 1], [0, 1], [0, 6]], [[0, 1], [0, 1], [3, 6]]])
    >>> foreground_extents(probs, labels, boxes, False).tolist()
    [[[0, 1], [0, 1], [1, 3]], [[0, 1], [0, 1], [4, 5]]]
    """
    boxes = np.asarray(boxes, dtype=np.int64)
    extents = np.repeat(boxes[:, :, :1], 2, axis=2)
    # the support labels are gathered at each box's full size: in the smallest integer type that
    # holds the labels (one byte below 256 components instead of ndimage's four)
    labels = labels.astype(np.min_scalar_type(max(int(labels.max(initial=0)), 0)), copy=False)
    for i, box in enumerate(boxes):
        mask = component_voxels(probs, labels, i + 1, box, multilabel, None if thresholds is None else thresholds[i])
        for d in range(mask.ndim):  # the extent along each axis from the mask's projection onto it
            hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d)))
            if not len(hits):
                break
            extents[i, d] = [box[d, 0] + hits[0], box[d, 0] + hits[-1] + 1]
    return extents


def find_objects(mask, spacing: Sequence[float], params: CropParams, rng: np.random.Generator | None = None,
                 rule_spacing: Sequence[float] | None = None, image_shape: Sequence[int] | None = None,
                 probabilities: torch.Tensor | None = None, multilabel: bool = False,
                 decided=None, proposal_threshold: float | None = None) -> FoundObjects:
    """The whole box pipeline on a binary mask: components -> drop small -> square + pad ->
    (jitter if ``rng``) -> fit to the image. ``rule_spacing``: the grid the size rule is judged on
    (see :func:`keep_large_enough`). ``image_shape``: the full-resolution grid the boxes are for,
    when the mask lies on a coarser grid of the same field of view (the coarse model's foreground):
    components are found on the coarse grid; each one's tight box is the foreground of
    ``probabilities`` (K, *image_shape: the coarse probabilities linearly upsampled, the cascade's
    canvas) within half a coarse cell of its cells (:func:`foreground_extents`: the box the mask of
    the upsampled probabilities gives, read only there, only the voxels whose foreground comes from
    that component; a component with no foreground there, a coarse cell just above the decision
    whose upsampled values all fall below it, is no object at all, as it was none on the full grid),
    or without ``probabilities`` the full-grid voxels of its cells (:func:`boxes_on_grid`). With
    recall-first proposals, ``decided`` (the coarse argmax foreground, on the mask's grid) and
    ``proposal_threshold``: a component holding no ``decided`` cell (a proposal below the decision,
    marked in ``below``) is read off ``probabilities`` where the foreground probability is at least
    the threshold (at the decision it has no voxel at all). ``spacing`` is always that of the full-resolution grid; the
    returned labels stay on the mask's grid.

    >>> mask = np.zeros((1, 64, 64), bool); mask[0, 20:30, 20:40] = True; mask[0, 50:52, 5:7] = True
    >>> found = find_objects(mask, [1.0, 1.0, 1.0], CropParams(patch_size=(1, 32, 32)))
    >>> found.ids.tolist(), found.tight_boxes.tolist(), found.n_dropped  # the 2 x 2 speck is below 5 px
    ([1], [[[0, 1], [20, 30], [20, 40]]], 1)
    >>> found.crop_boxes.tolist()  # squared and padded
    [[[0, 1], [11, 39], [16, 44]]]
    """
    mask = _as_numpy(mask)
    labels, boxes = component_boxes(mask, params.active)
    shape = mask.shape if image_shape is None else tuple(int(s) for s in image_shape)
    reach = boxes
    exists = np.ones(len(boxes), bool)
    holds = (None if decided is None
             else np.bincount(labels[_as_numpy(decided).astype(bool)], minlength=len(boxes) + 1)[1:] > 0)
    if shape != mask.shape:
        reach = boxes_on_grid(boxes, mask.shape, shape, pad_cells=0.5)
        thresholds = None
        if holds is not None and proposal_threshold is not None:
            thresholds = [None if h else float(proposal_threshold) for h in holds]
        boxes = (boxes_on_grid(boxes, mask.shape, shape) if probabilities is None
                 else foreground_extents(probabilities, labels, reach, multilabel, thresholds))
        exists = np.all(boxes[:, :, 1] > boxes[:, :, 0], axis=1)
    keep = keep_large_enough(boxes, spacing, params, rule_spacing) & exists
    dropped = reach[~keep & exists]
    boxes = boxes[keep]
    centre, size = square_and_pad(boxes, spacing, params)
    if rng is not None and len(boxes):
        centre, size = jitter(centre, size, shape, params, rng)
    return FoundObjects(labels, np.flatnonzero(keep) + 1, boxes, fit_to_image(centre, size, shape),
                        int((~keep & exists).sum()), np.flatnonzero(~keep & exists) + 1, dropped,
                        None if holds is None else ~holds[keep])


def boxes_meet(box: np.ndarray, others) -> bool:
    """Whether integer ``box`` (ndim, 2) shares a voxel with any of ``others`` (each (ndim, 2)).

    >>> boxes_meet(np.array([[0, 4], [0, 4]]), [np.array([[4, 6], [0, 4]]), np.array([[3, 5], [3, 9]])])
    True
    """
    return any(bool(np.all(np.minimum(b[:, 1], box[:, 1]) > np.maximum(b[:, 0], box[:, 0]))) for b in others)


def overlap_groups(boxes: np.ndarray) -> np.ndarray:
    """Group id (N,) of integer boxes (N, ndim, 2): boxes that share a voxel, directly or through
    other boxes, get the same id (0, 1, ... in order of first appearance). The crops of one group
    are fused with each other; crops of different groups never touch the same voxel.

    >>> overlap_groups(np.array([[[0, 4], [0, 4]], [[6, 9], [6, 9]], [[3, 7], [3, 7]], [[20, 22], [0, 2]]])).tolist()
    [0, 0, 0, 1]
    """
    from scipy.sparse.csgraph import connected_components

    boxes = np.asarray(boxes).reshape(len(boxes), -1, 2)
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    lo = np.maximum(boxes[:, None, :, 0], boxes[None, :, :, 0])
    hi = np.minimum(boxes[:, None, :, 1], boxes[None, :, :, 1])
    _, groups = connected_components(np.all(hi > lo, axis=-1), directed=False)
    _, first = np.unique(groups, return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(len(first))  # ids in order of each group's first box
    return order[groups]


def recall_proposals(foreground, probability, threshold: float | None, active: Sequence[bool],
                     max_extra: int | None = None) -> tuple[np.ndarray, int]:
    """The proposal mask of recall-first proposals: the coarse argmax ``foreground`` plus every
    component of ``probability >= threshold`` that holds no argmax voxel (an object the coarse
    stage saw but did not decide for), the ``max_extra`` with the highest peak probability first.
    Argmax components keep exactly their own extent (their crops do not change). Connectivity
    as :func:`component_boxes`. ``threshold`` None: the argmax foreground alone. Returns the mask
    and the number of extra components added.

    >>> fg = np.zeros((1, 1, 8), bool); fg[0, 0, 1:3] = True
    >>> prob = np.array([[[0.1, 0.9, 0.8, 0.4, 0.05, 0.3, 0.35, 0.1]]])
    >>> mask, n = recall_proposals(fg, prob, 0.25, [False, False, True])
    >>> mask[0, 0].astype(int).tolist(), n  # x = 3 joins the argmax object's low halo: not added
    ([0, 1, 1, 0, 0, 1, 1, 0], 1)
    >>> recall_proposals(fg, prob, 0.25, [False, False, True], max_extra=0)[1]
    0
    """
    fg = _as_numpy(foreground).astype(bool)
    if threshold is None:
        return fg, 0
    prob = _as_numpy(probability)
    labels, n = ndimage.label(prob >= threshold, structure=connectivity_structure(active))
    if n == 0:
        return fg, 0
    holds_argmax = np.bincount(labels[fg], minlength=n + 1).astype(bool)
    extra = np.flatnonzero(~holds_argmax[1:]) + 1
    if len(extra) == 0:
        return fg, 0
    peaks = np.asarray(ndimage.maximum(prob, labels, extra)).reshape(-1)
    extra = extra[np.argsort(-peaks, kind="stable")][:max_extra]
    keep = np.zeros(n + 1, bool)
    keep[extra] = True
    return fg | keep[labels], int(len(extra))


def sample_negative_box(image_shape: Sequence[int], sizes: np.ndarray, active: Sequence[bool],
                        is_free: Callable[[np.ndarray], bool], rng: np.random.Generator, tries: int = 20,
                        scale: tuple[float, float] = (0.75, 1.25), shrink: float = 0.85,
                        min_size: Sequence[float] | None = None) -> np.ndarray | None:
    """A training box (ndim, 2) that holds no object: one of ``sizes`` (N, ndim; the case's object
    crop sizes, so a negative looks like a false proposal of the coarse stage in scale), scaled by
    a uniform factor in ``scale`` along the active axes, placed uniformly inside the image (one
    index along inactive axes), accepted when ``is_free(box)``; None after ``tries`` draws.

    Every draw that does not fit makes the next ones ``shrink`` times smaller (never below
    ``min_size`` voxels per axis, e.g. the crop of the smallest object the size rule keeps), so an
    image that its objects nearly fill (a polyp close up) still gives a smaller negative instead of
    none; ``shrink`` 1 keeps every draw object-sized.

    >>> mask = np.zeros((1, 64, 64), bool); mask[0, :, :32] = True
    >>> free = lambda b: not mask[tuple(slice(lo, hi) for lo, hi in b)].any()
    >>> box = sample_negative_box((1, 64, 64), np.array([[1, 16, 16]]), [False, True, True], free,
    ...                           np.random.default_rng(0))
    >>> bool(box[2, 0] >= 32 and box[0].tolist() == [0, 1] and free(box))
    True
    >>> mask[0, :, :40] = True  # 24 px left free: no 30-50 px box of a 40 px object fits, a smaller one does
    >>> big = np.array([[1, 40, 40]])
    >>> sample_negative_box((1, 64, 64), big, [False, True, True], free, np.random.default_rng(0), shrink=1) is None
    True
    >>> box = sample_negative_box((1, 64, 64), big, [False, True, True], free, np.random.default_rng(0))
    >>> bool(free(box)), bool(box[2, 1] - box[2, 0] <= 24)
    (True, True)
    """
    shape = np.asarray(image_shape, dtype=np.int64)
    active = np.asarray(active, dtype=bool)
    sizes = np.asarray(sizes, dtype=float).reshape(-1, len(shape))
    floor = np.ones(len(shape)) if min_size is None else np.maximum(np.asarray(min_size, dtype=float), 1)
    if len(sizes) == 0:
        return None
    for attempt in range(int(tries)):
        size = sizes[rng.integers(len(sizes))].copy()
        size[active] = np.maximum(size[active] * rng.uniform(*scale) * shrink ** attempt, floor[active])
        size = np.where(active, np.clip(np.rint(size), 1, shape), 1).astype(np.int64)
        start = np.array([rng.integers(0, s - z + 1) for s, z in zip(shape, size)], dtype=np.int64)
        box = np.stack([start, start + size], axis=1)
        if is_free(box):
            return box
    return None


def smallest_crop_size(spacing: Sequence[float], params: CropParams) -> np.ndarray:
    """Size (voxels, (ndim,)) of the crop of the smallest object the size rule keeps: a box of
    ``min_object_size`` voxels of the finest active axis, squared and padded as every crop is
    (:func:`square_and_pad`); 1 along inactive axes. The floor of negative training crops.

    >>> smallest_crop_size([1.0, 1.0, 1.0], CropParams(patch_size=(1, 32, 32))).tolist()  # 5 px + 2 x 4 px
    [1.0, 13.0, 13.0]
    """
    spacing = np.asarray(spacing, dtype=float)
    active = params.active
    extent = np.where(active, params.min_object_size * _min_active_spacing(spacing, active) / spacing, 1.0)
    _, size = square_and_pad(np.stack([np.zeros_like(extent), extent], axis=1)[None], spacing, params)
    return size[0]


def boxes_from_mask(mask, spacing: Sequence[float], params: CropParams,
                    rng: np.random.Generator | None = None, rule_spacing: Sequence[float] | None = None
                    ) -> tuple[np.ndarray, int]:
    """:func:`find_objects`, its crop boxes and the number dropped only.

    >>> mask = np.zeros((1, 64, 64), bool); mask[0, 20:30, 20:40] = True
    >>> boxes, n_dropped = boxes_from_mask(mask, [1.0, 1.0, 1.0], CropParams(patch_size=(1, 32, 32)))
    >>> boxes.tolist(), n_dropped
    ([[[0, 1], [11, 39], [16, 44]]], 0)
    """
    found = find_objects(mask, spacing, params, rng, rule_spacing)
    return found.crop_boxes, found.n_dropped


def whole_image_boxes(image_shape: Sequence[int], active: Sequence[bool]) -> np.ndarray:
    """Boxes covering the whole image: one box if every axis is active, else one per index of the
    inactive axes (e.g. one per slice for a 2D stage on a 3D volume).

    >>> whole_image_boxes((2, 5, 6), [False, True, True]).tolist()  # one box per slice
    [[[0, 1], [0, 5], [0, 6]], [[1, 2], [0, 5], [0, 6]]]
    """
    image_shape = tuple(int(s) for s in image_shape)
    active = np.asarray(active, dtype=bool)
    inactive_ranges = [range(s) if not a else [None] for s, a in zip(image_shape, active)]
    boxes = []
    for idx in np.ndindex(*[len(r) for r in inactive_ranges]):
        box = []
        for ax, (i, a) in enumerate(zip(idx, active)):
            box.append([0, image_shape[ax]] if a else [i, i + 1])
        boxes.append(box)
    return np.array(boxes, dtype=np.int64).reshape(-1, len(image_shape), 2)


# ----------------------------------------------------------------------------------------------
# resampling (torch, any device)
# ----------------------------------------------------------------------------------------------

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def _normalised_axis_coords(start: torch.Tensor, stop: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of n samples on [start, stop) of an axis of
    ``length`` voxels; shape (B, n). float32 throughout: devices without float64 (Apple's mps)
    must be able to build the grid, and float32 resolves 1/100 voxel up to ~10^5 voxels."""
    j = torch.arange(n, device=start.device, dtype=torch.float32)
    src = start[:, None] + (j[None] + 0.5) * (stop - start)[:, None] / n - 0.5
    return (2 * src + 1) / length - 1


def _grid_from_axes(axis_coords: list[torch.Tensor]) -> torch.Tensor:
    """Dense sampling grid (B, *n, ndim) from per-axis coordinates (B, n_d); grid_sample wants
    the last dimension in (x, y, z) order, i.e. reversed axes."""
    ndim = len(axis_coords)
    b = axis_coords[0].shape[0]
    sizes = [c.shape[1] for c in axis_coords]
    expanded = []
    for d, c in enumerate(axis_coords):
        shape = [b] + [1] * ndim
        shape[1 + d] = sizes[d]
        expanded.append(c.reshape(shape).expand(b, *sizes))
    return torch.stack(expanded[::-1], dim=-1)


def downscale(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Images (B, C, *spatial) resized to ``size`` with linear interpolation, antialiased when
    shrinking (2D; 3D has no antialiased kernel in torch and uses area averaging when shrinking):
    the input of every coarse stage (the cascade's coarse model, the end-to-end model's coarse
    module, L-Net), made the same way in training and prediction, on the device.

    >>> x = downscale(torch.ones(2, 3, 64, 48), (32, 32))  # per image and channel; constants stay constant
    >>> x.shape, bool(torch.allclose(x, torch.ones(())))
    (torch.Size([2, 3, 32, 32]), True)
    """
    size = tuple(int(s) for s in size)
    if tuple(images.shape[2:]) == size:
        return images
    shrinking = all(s <= i for s, i in zip(size, images.shape[2:]))
    if images.ndim == 4:
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    if shrinking:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="trilinear", align_corners=False)


def resample_image(image, shape: Sequence[int]):
    """A whole case (C, *spatial) resized to ``shape`` by :func:`downscale` (antialiased linear),
    on the image's device, float32; a numpy array in gives a numpy array out. When the first axis
    keeps its size (a 2D configuration of a 3D scan, or a 2D image stored as one slice), the
    slices are resized independently as a batch of 2D images, so no slice ever blends into its
    neighbours: the grid a 2D coarse model is trained and predicted on.

    >>> x = torch.zeros(1, 3, 64, 64); x[:, 1] = 1.0       # 3 slices, only the middle one bright
    >>> y = resample_image(x, (3, 16, 16))
    >>> tuple(y.shape), float(y[0, 0].max()), float(y[0, 1].min())
    ((1, 3, 16, 16), 0.0, 1.0)
    """
    as_numpy = isinstance(image, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(image)) if as_numpy else image
    x = x.float()
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[1:]) != shape:
        if x.ndim == 4 and shape[0] == x.shape[1]:  # slice by slice: (Z, C, Y, X) as a batch
            x = downscale(x.transpose(0, 1), shape[1:]).transpose(0, 1)
        else:
            x = downscale(x[None], shape)[0]
    x = x.contiguous()
    return x.numpy() if as_numpy else x


def crop_and_resample(image, boxes: np.ndarray, out_size: Sequence[int], mode: str = "linear",
                      padding_mode: str = "border"):
    """Crops of ``image`` (C, *spatial) at ``boxes`` (N, ndim, 2), each resampled to ``out_size``:
    returns (N, C, *out_size) on the image's device, float32. All boxes go through ONE
    grid_sample call (their grids are stacked along the first spatial axis of a batch of one), so
    there is no per-crop kernel launch or host round trip. Boxes may be fractional and may reach
    outside the image (``padding_mode`` 'zeros' or 'border' decides what is read there); boxes
    given as a tensor keep their graph: the crop is differentiable in the box coordinates (the
    affine map of a spatial transformer: per axis scale (stop - start) / length and translation
    (start + stop) / length - 1 in grid_sample's coordinates).
    numpy in -> numpy out.

    >>> image = torch.arange(16.0).reshape(1, 1, 4, 4)  # (C, Z, Y, X)
    >>> crops = crop_and_resample(image, np.array([[[0, 1], [0, 2], [2, 4]]]), (1, 4, 4), "nearest")
    >>> crops.shape, crops[0, 0, 0, 0].tolist()  # (N, C, *out_size): the box's 2 x 2 pixels, each twice
    (torch.Size([1, 1, 1, 4, 4]), [2.0, 2.0, 3.0, 3.0])
    """
    was_numpy = not isinstance(image, torch.Tensor)
    img = torch.as_tensor(image)
    spatial = img.shape[1:]
    ndim = len(spatial)
    if isinstance(boxes, torch.Tensor):  # L-SNet's RoIs: the crop is differentiable in the box
        b = boxes.to(device=img.device, dtype=torch.float32).reshape(-1, ndim, 2)
    else:
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, ndim, 2).astype(np.float32),
                            device=img.device)
    out_size = tuple(int(s) for s in out_size)
    if len(out_size) != ndim:
        raise ValueError(f"out_size {out_size} does not match the image's {ndim} spatial axes")
    n = len(b)
    if n == 0:
        out = img.new_zeros((0, img.shape[0], *out_size), dtype=torch.float32)
        return out.numpy() if was_numpy else out
    coords = [_normalised_axis_coords(b[:, d, 0], b[:, d, 1], out_size[d], spatial[d]) for d in range(ndim)]
    grid = _grid_from_axes(coords)  # (N, *out, ndim)
    grid = grid.reshape(1, n * out_size[0], *out_size[1:], ndim)
    out = F.grid_sample(img[None].float(), grid, mode=_MODES[mode], padding_mode=padding_mode, align_corners=False)
    out = out[0].reshape(img.shape[0], n, *out_size).transpose(0, 1)
    return out.cpu().numpy() if was_numpy else out


def paste_region(box: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """The image voxels (ndim, 2) int a box (ndim, 2) covers: its integer hull clipped to the image
    (the box itself for an integer box inside the image; fractional boxes are L-SNet's RoIs).

    >>> paste_region(np.array([[-1.5, 2.2], [3.0, 9.5]]), (8, 8)).tolist()
    [[0, 3], [3, 8]]
    """
    box = np.asarray(box, dtype=np.float64)
    lo = np.clip(np.floor(box[:, 0] + 1e-6), 0, np.asarray(image_shape))
    hi = np.clip(np.ceil(box[:, 1] - 1e-6), 0, np.asarray(image_shape))
    return np.stack([lo, np.maximum(hi, lo)], axis=1).astype(np.int64)


def resample_crop_to_box(crop: torch.Tensor, box: np.ndarray, mode: str = "linear",
                         region: np.ndarray | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`crop_and_resample` for one crop (K, *n): its values on the voxels of
    ``region`` (ndim, 2) int (default: ``box``, integer), with the exact inverse coordinate
    mapping of ``box`` (ndim, 2; may be fractional). Returns (K, *region_size) float32, written
    into ``out`` (a float32 tensor of that shape on the crop's device) when given.

    >>> crop = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (C, Z, Y, X) = (1, 1, 2, 2)
    >>> resample_crop_to_box(crop, np.array([[0, 1], [0, 4], [0, 4]]), "nearest")[0, 0].tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]
    """
    ndim = crop.ndim - 1
    box = np.asarray(box, dtype=np.float64).reshape(ndim, 2)
    region = np.asarray(box if region is None else region, dtype=np.int64).reshape(ndim, 2)
    integer = np.array_equal(box, np.round(box))
    inside = np.all(region[:, 0] >= box[:, 0]) and np.all(region[:, 1] <= box[:, 1])
    if mode == "linear" and integer and inside and ndim in (2, 3):
        # an integer box, or rows of it: the same map is F.interpolate's (half-pixel centres, clamped
        # at the border), separable and without a sampling grid (linear_rows): ~5 x faster on a CPU,
        # and the cost is the region's alone
        size = (box[:, 1] - box[:, 0]).astype(np.int64)
        local = region - box[:, :1].astype(np.int64)
        return linear_rows(crop.float(), size, tuple(local[0]), window=local[1:], out=out)
    coords = []
    for d in range(ndim):
        i = torch.arange(int(region[d, 0]), int(region[d, 1]), device=crop.device, dtype=torch.float32)
        coords.append((2 * (i + 0.5 - float(box[d, 0])) / float(box[d, 1] - box[d, 0]) - 1)[None])
    grid = _grid_from_axes(coords)
    values = F.grid_sample(crop[None].float(), grid, mode=_MODES[mode], padding_mode="border", align_corners=False)[0]
    return values if out is None else out.copy_(values)


def slab_ranges(length: int, voxels_per_slice: int, slab_voxels: int) -> list[tuple[int, int]]:
    """Ranges [a, b) along an axis of ``length`` slices, each holding at most ``slab_voxels``
    voxels at ``voxels_per_slice`` per slice (at least one slice): how large arrays are worked
    through a bounded slab at a time.

    >>> slab_ranges(5, 10, 25)
    [(0, 2), (2, 4), (4, 5)]
    """
    step = max(1, int(slab_voxels) // max(1, int(voxels_per_slice)))
    return [(a, min(a + step, int(length))) for a in range(0, int(length), step)]


def linear_rows(probs: torch.Tensor, shape: Sequence[int], rows: tuple[int, int] | None = None,
                dtype: torch.dtype | None = None, background_from_rest: bool = False,
                window: np.ndarray | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[z0, z1)`` (along the first axis) of ``probs`` (K, *grid) linearly interpolated to the
    grid ``shape`` of the same field of view (half-pixel centres, clamped at the border: the values
    ``F.interpolate(..., align_corners=False)`` gives, up to float rounding), optionally only the
    in-plane ``window`` ((ndim - 1, 2) of the other axes). Separable: the source slices the rows need
    are interpolated in-plane (one batched 2D interpolation), then blended along the first axis, so
    the cost is that of the rows asked for. One arithmetic for every caller (the coarse canvas slab by
    slab, a crop pasted back slab by slab, a box of the canvas read without the canvas): they agree
    bit for bit. ``background_from_rest`` (softmax, channel 0 = background): channel 0 is 1 - the sum
    of the others (one channel less to interpolate). Returns (K, z1 - z0, *window size) of ``dtype``
    (default ``probs``'s), written into ``out`` when given.

    >>> p = torch.tensor([[[[0.0, 1.0]]]])                  # (K, Z, Y, X) = (1, 1, 1, 2)
    >>> linear_rows(p, (1, 1, 4))[0, 0, 0].tolist()
    [0.0, 0.25, 0.75, 1.0]
    >>> linear_rows(p, (1, 1, 4), window=np.array([[0, 1], [1, 3]]))[0, 0, 0].tolist()
    [0.25, 0.75]
    """
    shape = tuple(int(s) for s in shape)
    grid = tuple(probs.shape[1:])
    k = probs.shape[0]
    z0, z1 = (0, shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    plane = tuple(slice(int(a), int(b)) for a, b in window) if window is not None else ()
    size = [z1 - z0, *(len(range(n)[s]) for n, s in zip(shape[1:], plane))] if plane else [z1 - z0, *shape[1:]]
    if out is None:
        out = torch.empty((k, *size), dtype=dtype or probs.dtype, device=probs.device)
    if grid == shape:
        out.copy_(probs[(slice(None), slice(z0, z1), *plane)])
        return out
    rest = 1 if background_from_rest and k > 1 else 0  # the first channel made from the others
    # the first axis's source position of every output row, as F.interpolate computes it
    src = np.maximum((np.arange(z0, z1) + 0.5) * grid[0] / shape[0] - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), grid[0] - 1)
    hi = np.minimum(lo + 1, grid[0] - 1)
    weights = src - np.floor(src)
    first, last = int(lo[0]), int(hi[-1])
    planes = probs[rest:, first:last + 1].transpose(0, 1).float()  # (n, K - rest, *in-plane grid)
    if tuple(planes.shape[2:]) != shape[1:]:
        planes = F.interpolate(planes, size=shape[1:], mode="bilinear" if len(shape) == 3 else "linear",
                               align_corners=False)
    if plane:
        planes = planes[(slice(None), slice(None), *plane)]
    # row by row (a plane each: no gathered copy of the source planes), the blend written into ``out``
    direct = out.dtype == planes.dtype  # float32 rows blended straight into ``out`` (no row-sized copy)
    for j, (a, b, w) in enumerate(zip(lo - first, hi - first, weights)):
        if w != 0.0 and direct:
            row = torch.lerp(planes[a], planes[b], float(w), out=out[rest:, j])
        else:
            row = planes[a] if w == 0.0 else torch.lerp(planes[a], planes[b], float(w))  # (K - rest, ...)
            out[rest:, j] = row
        if rest:
            out[0, j] = torch.sub(1.0, row[0] if row.shape[0] == 1 else row.sum(0))
    return out


def upsample_probabilities(probs: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None,
                           slab_voxels: int = 2 ** 24, background_from_rest: bool = False) -> torch.Tensor:
    """Probabilities (K, *grid) on a coarse grid brought to the full grid ``shape`` of the same field
    of view by linear interpolation (:func:`linear_rows`), written slab by slab along the first axis
    into ONE new tensor of ``dtype`` (default ``probs``'s) on ``probs``'s device: a half-precision
    canvas never has a float32 twin. ``background_from_rest`` (softmax probabilities, channel 0 =
    background): channel 0 is 1 - the sum of the others, interpolated from them (interpolation keeps
    a sum of 1: the same map up to float rounding, one channel less to interpolate: half the work
    for a foreground / background model).

    >>> p = torch.tensor([[[[0.0, 1.0]]]])                  # (K, Z, Y, X) = (1, 1, 1, 2)
    >>> upsample_probabilities(p, (1, 1, 4))[0, 0, 0].tolist()
    [0.0, 0.25, 0.75, 1.0]
    >>> upsample_probabilities(torch.cat([1 - p, p]), (1, 1, 4), background_from_rest=True)[:, 0, 0].tolist()
    [[1.0, 0.75, 0.25, 0.0], [0.0, 0.25, 0.75, 1.0]]
    >>> upsample_probabilities(torch.rand(2, 3, 5, 6), (12, 10, 12), slab_voxels=100).shape  # 3D, slab by slab
    torch.Size([2, 12, 10, 12])
    """
    shape = tuple(int(s) for s in shape)
    k = probs.shape[0]
    out = torch.empty((k, *shape), dtype=dtype or probs.dtype, device=probs.device)
    for z0, z1 in slab_ranges(shape[0], k * int(np.prod(shape[1:])), slab_voxels):
        linear_rows(probs, shape, (z0, z1), background_from_rest=background_from_rest, out=out[:, z0:z1])
    return out


class UpsampledProbabilities:
    """The canvas :func:`upsample_probabilities` would make, without making it: indexing with
    ``[:, *box slices]`` computes that box's values (:func:`linear_rows`: bit for bit the canvas's;
    the cost of the box's rows, not of the volume). What the box search reads when the cascade
    builds no full-size canvas.

    >>> coarse = torch.rand(2, 3, 4, 5)
    >>> lazy = UpsampledProbabilities(coarse, (6, 8, 10), torch.float16)
    >>> canvas = upsample_probabilities(coarse, (6, 8, 10), torch.float16)
    >>> lazy.shape, bool(torch.equal(lazy[:, 1:4, 2:7, 3:5], canvas[:, 1:4, 2:7, 3:5]))
    (torch.Size([2, 6, 8, 10]), True)
    """

    def __init__(self, probs: torch.Tensor, shape: Sequence[int], dtype: torch.dtype | None = None,
                 background_from_rest: bool = False):
        self.probs, self.dtype, self.background_from_rest = probs, dtype or probs.dtype, background_from_rest
        self.shape = torch.Size((probs.shape[0], *(int(s) for s in shape)))
        self.device = probs.device

    def __getitem__(self, index) -> torch.Tensor:
        if not (isinstance(index, tuple) and index[0] == slice(None) and len(index) == len(self.shape)
                and all(isinstance(s, slice) and s.step is None for s in index)):
            raise IndexError("UpsampledProbabilities takes [:, a:b, ...] (every axis a slice)")
        ranges = [range(n)[s] for n, s in zip(self.shape[1:], index[1:])]
        rows = (ranges[0].start, ranges[0].stop)
        window = np.array([[r.start, r.stop] for r in ranges[1:]], dtype=np.int64)
        return linear_rows(self.probs, self.shape[1:], rows, self.dtype, self.background_from_rest, window)


def _box_slices(box: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in box)


def probabilities_to_logits(probs: torch.Tensor, multilabel: bool, eps: float = 1e-6,
                            inplace: bool = False) -> torch.Tensor:
    """Logits whose softmax (or sigmoid) gives back ``probs`` (renormalised for softmax), so that
    nnU-Net's own export applies its usual nonlinearity to fused probabilities. ``inplace``
    overwrites ``probs`` (no second K x volume array on large volumes). Half-precision ``probs``
    (the cascade's canvas; nnU-Net's own predictor returns half logits too) are clamped to
    [2^-11, 1 - 2^-11], the closest to 0 and 1 that keeps a sigmoid's logit finite in half.

    >>> probs = torch.tensor([[0.25, 0.9], [0.75, 0.1]])  # (K, N): softmax channels
    >>> probabilities_to_logits(probs, multilabel=False).softmax(0).allclose(probs)
    True
    """
    if probs.dtype == torch.float16:
        eps = max(eps, 2.0 ** -11)
    p = probs.clamp_(eps, 1 - eps) if inplace else probs.clamp(eps, 1 - eps)
    if multilabel:
        log_not_p = torch.log1p(-p)
        return p.log_().sub_(log_not_p)
    return p.log_()


def nonlinearity(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Probabilities of a batch of logits (N, K, *spatial): softmax over the channels (axis 1), or
    sigmoid for region outputs.

    >>> nonlinearity(torch.zeros(1, 2, 3), multilabel=False)[0, :, 0].tolist()
    [0.5, 0.5]
    """
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def foreground_probability(probs: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Probability (*spatial) that a voxel is foreground at all: 1 - background (softmax, channel 0
    = background) or the largest region probability (sigmoid/regions).

    >>> foreground_probability(torch.tensor([[0.7, 0.2], [0.1, 0.5], [0.2, 0.3]]), multilabel=False).tolist()
    [0.30000001192092896, 0.800000011920929]
    """
    return probs.amax(0) if multilabel else 1.0 - probs[0]


def segmented_confidence(probs: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per crop (N,): how sure the fine stage is of what it segments: its mean foreground
    probability (:func:`foreground_probability`) over the voxels it labels foreground
    (:func:`foreground_from_probabilities`); 0 where it labels none. ``probs``: (N, K, *spatial).
    A proposal below the coarse decision is fused only when this reaches
    ``CropParams.proposal_confirmation``: a real object comes back sharp, a false proposal as a
    faint blob or nothing.

    >>> probs = torch.tensor([[[0.1, 0.4, 0.9], [0.9, 0.6, 0.1]],    # sure of two voxels: (0.9 + 0.6) / 2
    ...                       [[0.45, 0.8, 0.9], [0.55, 0.2, 0.1]],  # one faint voxel: 0.55
    ...                       [[0.9, 0.8, 0.9], [0.1, 0.2, 0.1]]])   # nothing segmented: 0
    >>> segmented_confidence(probs, multilabel=False).tolist()
    [0.75, 0.550000011920929, 0.0]
    """
    foreground = foreground_probability(probs.transpose(0, 1), multilabel).flatten(1)  # (N, voxels)
    segmented = foreground_from_probabilities(probs.transpose(0, 1), multilabel).flatten(1)
    return (foreground * segmented).sum(1) / segmented.sum(1).clamp(min=1)


def foreground_from_probabilities(probs: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Bool mask of the voxels nnU-Net's segmentation would label as foreground, without its
    int64 argmax volume: softmax (channel 0 = background): some foreground channel beats the
    background strictly (argmax takes the first of tied maxima); sigmoid/regions: some region's
    probability is above 0.5 (nnU-Net's region threshold).

    >>> probs = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]])  # (K, N), channel 0 background
    >>> foreground_from_probabilities(probs, multilabel=False).tolist()  # a tie stays background
    [False, True, False]
    """
    if multilabel:
        return (probs > 0.5).any(0)
    if probs.shape[0] == 1:
        return torch.zeros(probs.shape[1:], dtype=torch.bool, device=probs.device)
    if probs.shape[0] == 2:  # one foreground channel: no reduction (half precision reduces slowly on a CPU)
        return probs[1] > probs[0]
    return probs[1:].amax(0) > probs[0]
