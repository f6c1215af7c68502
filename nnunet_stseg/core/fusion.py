"""Fusion: many stage outputs of one image become one prediction.

- :func:`fuse_crops`: the cascade's fine crops pasted back onto the full grid (logical OR of the
  crops: max over foreground, min over background);
- the polar method's multi-object fusion (methods.md section 3b): every polar prediction, back in
  Cartesian space, gets weight 2 on its component that holds its own origin and 1 on its other
  components (:func:`origin_component_weights`); the weights are summed, normalised and
  thresholded by hysteresis (:func:`hysteresis_fusion`); inside the fused mask the classes are the
  predictions' probabilities averaged with the same weights (:func:`fuse_polar_slice`).

Pure functions with no nnU-Net imports, on numpy arrays and torch tensors (any device).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from nnunet_stseg.core.geometry import _box_slices, boxes_meet, paste_region, resample_crop_to_box, slab_ranges


def _or_into(target: torch.Tensor, other: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """The probabilistic OR of two (K, ...) maps written into ``target``: the channel-wise max for
    region (sigmoid) maps; for softmax maps the min of the background channel and the max of the
    others. Returns ``target``."""
    if multilabel:
        return torch.maximum(target, other, out=target)
    torch.minimum(target[:1], other[:1], out=target[:1])
    torch.maximum(target[1:], other[1:], out=target[1:])
    return target


def fuse_crops(probs, boxes: np.ndarray, image_shape: Sequence[int], multilabel: bool = False,
               mode: str = "linear", coverage: bool = True, out: torch.Tensor | None = None,
               covered: torch.Tensor | None = None, background: torch.Tensor | None = None,
               window: np.ndarray | None = None):
    """Paste per-crop probabilities (N, K, *n) back into an image of ``image_shape`` and fuse.

    Softmax outputs (``multilabel=False``, channel 0 = background): foreground channels take the
    max over crops and background the min, i.e. a voxel is foreground if ANY crop says so (the
    paper's logical OR). Sigmoid/region outputs (``multilabel=True``): every channel is the max
    over crops. Voxels outside every crop keep ``background`` (K, *image_shape), the probabilities
    the caller has there (the cascade: the coarse model's, so that exported probabilities stay
    soft and an ensemble can average them); without it they are certain background (probability
    1, regions 0). Inside crops ``background`` is replaced, never fused.
    Fractional boxes (L-SNet's RoIs, which may reach outside the image) paste onto the voxels
    they cover inside the image, by the exact inverse of the map that cut them.
    Returns (K, *image_shape) probabilities (not renormalised) and a bool coverage mask
    (None with ``coverage=False`` and no ``background``: one full-size array less).
    ``out`` and ``covered``: the canvas and coverage returned by an earlier call (torch), to fuse
    this batch of crops into, so that any number of crops is fused batch by batch with the same
    result (``background`` only on the first call). ``covered`` may also be a list of the voxel
    boxes (ndim, 2) pasted so far (start with ``[]``; it is extended and returned): the same
    fusion without a full-size mask, for integer boxes or any boxes' :func:`paste_region`.
    ``window`` (ndim, 2) int: the fused array (and ``out``, ``background``, a ``covered`` mask)
    holds only these voxels of the image, and each box is pasted where it meets them (the same
    values there as on the whole image): a large group of crops fused a slab at a time.

    >>> crop = np.zeros((1, 2, 2, 2), np.float32); crop[0, 1] = 1.0  # one crop, all foreground
    >>> fused, covered = fuse_crops(crop, np.array([[[1, 3], [0, 2]]]), (4, 4), mode="nearest")
    >>> fused.argmax(0)
    array([[0, 0, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 0, 0]])
    """
    was_numpy = not isinstance(probs, torch.Tensor)
    p = torch.as_tensor(probs)
    k = p.shape[1]
    image_shape = tuple(int(s) for s in image_shape)
    window = (np.stack([np.zeros(len(image_shape), np.int64), np.asarray(image_shape, np.int64)], -1)
              if window is None else np.asarray(window, np.int64).reshape(len(image_shape), 2))
    canvas_shape = tuple(int(v) for v in window[:, 1] - window[:, 0])
    boxes = np.asarray(boxes)
    integer = np.issubdtype(boxes.dtype, np.integer)
    if len(boxes) and (np.any(boxes[:, :, 1] <= boxes[:, :, 0]) or (integer and (
            np.any(boxes[:, :, 0] < 0) or np.any(boxes[:, :, 1] > np.asarray(image_shape))))):
        raise ValueError("fuse_crops needs non-empty boxes, integer ones inside the image (as fit_to_image returns), "
                         f"got {boxes.tolist()} for image shape {image_shape}")
    if out is not None:
        if tuple(out.shape) != (k, *canvas_shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(k, *canvas_shape)}")
        fused = out
    elif background is not None:
        if tuple(background.shape) != (k, *canvas_shape):
            raise ValueError(f"background has shape {tuple(background.shape)}, expected {(k, *canvas_shape)}")
        fused = background.float()
    else:
        fused = p.new_zeros((k, *canvas_shape), dtype=torch.float32)
        if not multilabel:
            fused[0] = 1.0
    if covered is None and (coverage or background is not None):
        covered = torch.zeros(canvas_shape, dtype=torch.bool, device=fused.device)
    scratch = None
    for crop, box in zip(p, boxes):
        voxels = box if integer else paste_region(box, image_shape)
        if np.any(voxels[:, 1] <= voxels[:, 0]):  # a fractional box outside the image
            continue
        earlier = list(covered) if isinstance(covered, list) else None
        voxels = np.asarray(voxels)
        inside = np.stack([np.maximum(voxels[:, 0], window[:, 0]), np.minimum(voxels[:, 1], window[:, 1])], -1)
        for part in _paste_slabs(inside) if np.all(inside[:, 1] > inside[:, 0]) else ():
            # one slab of a large box at a time: the float32 arrays below are a slab's, not the box's
            sl = (slice(None), *_box_slices(part - window[:, :1]))
            size = tuple(int(v) for v in part[:, 1] - part[:, 0])
            n = k * int(np.prod(size))
            if scratch is None or scratch.numel() < n:
                # one float32 buffer for every slab of this call: a fresh large array costs its page
                # faults, about as much as the interpolation that fills it
                scratch = torch.empty(n, dtype=torch.float32, device=p.device)
            pasted = resample_crop_to_box(crop, box, mode, part, out=scratch[:n].view(k, *size)).to(fused.device)
            fresh = earlier is not None and not boxes_meet(part, earlier)
            if earlier is not None:
                seen = None if fresh else covered_by(earlier, part, fused.device)
            else:
                seen = None if covered is None else covered[sl[1:]]
            if fresh or (seen is not None and not bool(seen.any())):
                fused[sl] = pasted  # no crop here yet (objects seldom overlap): the crop replaces the canvas
            elif seen is None:  # the OR everywhere, straight into the canvas (min / max are exact, then rounded)
                _or_into(fused[sl], pasted, multilabel)  # a view: written into the canvas
            else:
                # the OR, computed into a copy of the pasted values where no crop came before
                # (certain background there gives the pasted values themselves)
                combined = _or_into(pasted.clone(), fused[sl], multilabel)
                # first crop over a voxel replaces what the canvas had there (certain background: the same)
                fused[sl] = torch.where(seen, combined, pasted)
                del combined
            del pasted, seen
            if isinstance(covered, torch.Tensor):
                covered[sl[1:]] = True
        if isinstance(covered, list):
            covered.append(np.asarray(voxels))
    if was_numpy:
        return fused.cpu().numpy(), None if covered is None else covered.cpu().numpy()
    return fused, covered




PASTE_SLAB_VOXELS = 1 << 22
"""Voxels of one slab when :func:`fuse_crops` pastes a large box (4 M: 16 MiB per float32 channel)."""


def _paste_slabs(voxels: np.ndarray) -> list[np.ndarray]:
    """``voxels`` (ndim, 2) cut along its first axis into slabs of at most
    :data:`PASTE_SLAB_VOXELS` voxels (at least one slice each); a box that fits is itself."""
    size = voxels[:, 1] - voxels[:, 0]
    ranges = slab_ranges(int(size[0]), int(np.prod(size[1:])), PASTE_SLAB_VOXELS)
    if len(ranges) == 1:
        return [voxels]
    parts = []
    for a, b in ranges:
        part = voxels.copy()
        part[0] = (voxels[0, 0] + a, voxels[0, 0] + b)
        parts.append(part)
    return parts


def covered_by(pasted: list[np.ndarray], voxels: np.ndarray, device) -> torch.Tensor:
    """Bool mask (*size of ``voxels``) of the voxels of ``voxels`` (ndim, 2) that any of the ``pasted``
    boxes (each (ndim, 2)) covers.

    >>> covered_by([np.array([[0, 2], [1, 3]])], np.array([[1, 3], [0, 3]]), "cpu").int().tolist()
    [[0, 1, 1], [0, 0, 0]]
    """
    seen = torch.zeros(tuple(int(v) for v in voxels[:, 1] - voxels[:, 0]), dtype=torch.bool, device=device)
    for b in pasted:
        lo, hi = np.maximum(b[:, 0], voxels[:, 0]), np.minimum(b[:, 1], voxels[:, 1])
        if np.all(hi > lo):
            seen[tuple(slice(int(a - o), int(z - o)) for a, z, o in zip(lo, hi, voxels[:, 0]))] = True
    return seen


def origin_component_weights(masks, origins) -> np.ndarray:
    """Weight maps for binary predictions (N, H, W), one per origin (N, 2): 2 on the connected
    component of prediction i that contains origin i (the object that polar transform centred),
    1 on every other predicted component, 0 on background. An origin that falls on background of
    its own prediction gives that prediction weight 1 everywhere it predicts foreground.

    >>> masks = np.zeros((1, 1, 7), bool); masks[0, 0, 1:3] = masks[0, 0, 5:7] = True
    >>> origin_component_weights(masks, [[0, 1]])[0, 0]
    array([0., 2., 2., 0., 0., 1., 1.], dtype=float32)
    """
    m = np.asarray(masks).astype(bool)
    o = np.rint(np.asarray(origins, dtype=np.float64).reshape(len(m), -1)[:, -2:]).astype(int)
    weights = m.astype(np.float32)
    for i in range(len(m)):
        y = int(np.clip(o[i, 0], 0, m.shape[1] - 1))
        x = int(np.clip(o[i, 1], 0, m.shape[2] - 1))
        if not m[i, y, x]:
            continue
        labels, _ = ndimage.label(m[i], structure=np.ones((3, 3), bool))
        weights[i][labels == labels[y, x]] = 2.0
    return weights


def hysteresis_fusion(score, low: float = 0.0, high: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a summed weight map (H, W) to [0, 1] by its maximum, then hysteresis: a
    connected region of pixels ``> low`` is kept only if some pixel in it is ``> high``
    (scikit-image's ``apply_hysteresis_threshold``). Returns the mask and the normalised map.

    >>> mask, norm = hysteresis_fusion(np.array([[0, 4, 4, 0, 1, 0]]), low=0.0, high=0.4)
    >>> mask.astype(int), norm
    (array([[0, 1, 1, 0, 0, 0]]), array([[0.  , 1.  , 1.  , 0.  , 0.25, 0.  ]], dtype=float32))
    """
    from skimage.filters import apply_hysteresis_threshold

    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    score = np.asarray(score, dtype=np.float32)
    top = float(score.max()) if score.size else 0.0
    if top <= 0:
        return np.zeros(score.shape, bool), np.zeros(score.shape, np.float32)
    score = score / top
    return apply_hysteresis_threshold(score, low, high), score


def fuse_polar_predictions(masks, origins, low: float = 0.0, high: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """The multi-object fusion of the polar method for binary predictions (N, H, W), one per
    origin, already in Cartesian space: weighted sum (:func:`origin_component_weights`), then
    :func:`hysteresis_fusion`. A region predicted by one polar view only, off its origin, scores
    1 / max and is dropped when that is <= high. Returns the final mask and the normalised map.

    >>> masks = np.zeros((2, 1, 8), bool); masks[0, 0, 1:3] = True; masks[1, 0, 1:3] = masks[1, 0, 5:7] = True
    >>> mask, score = fuse_polar_predictions(masks, [[0, 1], [0, 5]], low=0.0, high=0.4)
    >>> mask.astype(int)[0].tolist(), [round(float(v), 2) for v in score[0]]
    ([0, 1, 1, 0, 0, 1, 1, 0], [0.0, 1.0, 1.0, 0.0, 0.0, 0.67, 0.67, 0.0])
    """
    m = np.asarray(masks).astype(bool)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    score = origin_component_weights(m, origins).sum(axis=0) if len(m) else np.zeros(m.shape[1:], np.float32)
    return hysteresis_fusion(score, low, high)


def polar_fusion_weights(cartesian, origins, multilabel: bool, view_weights=None) -> tuple[np.ndarray, torch.Tensor]:
    """For predictions already back in Cartesian space, (N, K, H, W) probabilities with one origin
    (N, 2) ``(y, x)`` each: the hysteresis score weights (N, H, W) (2 / 1 / 0, see
    :func:`origin_component_weights`, from each prediction's binary foreground: argmax, or any
    region > 0.5) and the class-averaging weights (N, H, W), 2 on the origin's component and 1
    everywhere else (on the device of ``cartesian``). ``view_weights`` (N,), e.g. the origins'
    confidences, multiply both, so a view from a doubtful origin counts less in the fusion.

    >>> cart = torch.zeros((1, 2, 1, 6)); cart[0, 1, 0, 1:3] = cart[0, 1, 0, 4:6] = 1.0; cart[0, 0] = 1 - cart[0, 1]
    >>> score, class_weights = polar_fusion_weights(cart, [[0, 1]], multilabel=False)
    >>> score[0, 0].tolist(), class_weights[0, 0].tolist()
    ([0.0, 2.0, 2.0, 0.0, 1.0, 1.0], [1.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    """
    p = torch.as_tensor(cartesian)
    predicted = (p > 0.5).any(dim=1) if multilabel else p.argmax(dim=1) > 0
    score = origin_component_weights(predicted.cpu().numpy(), origins)
    class_weights = np.where(score == 2, 2.0, 1.0).astype(np.float32)
    if view_weights is not None:
        w = np.asarray(view_weights, dtype=np.float32).reshape(-1, 1, 1)
        score, class_weights = score * w, class_weights * w
    return score, torch.as_tensor(class_weights, device=p.device)


def fuse_polar_slice(score, class_sum: torch.Tensor, weight_sum: torch.Tensor, multilabel: bool,
                     low: float = 0.0, high: float = 0.4) -> torch.Tensor:
    """The fused probabilities (K, H, W) of one slice from its accumulated sums over polar
    predictions: ``score`` (H, W) the summed :func:`polar_fusion_weights` score weights,
    ``class_sum`` (K, H, W) the class probabilities summed with the class weights, ``weight_sum``
    (H, W) the summed class weights.

    The mask is :func:`hysteresis_fusion` of ``score``. Softmax outputs (channel 0 background):
    outside the mask background 1; inside it the weighted mean of the foreground classes,
    renormalised over the foreground (the mask says "object"; the mean says which class).
    Region outputs: the weighted mean inside the mask, 0 outside, and inside the mask at least the
    strongest region is lifted just above 0.5 (the mask says some region is there).

    >>> cart = torch.zeros((1, 2, 1, 4)); cart[0, 1, 0, :2] = 0.9; cart[0, 0] = 1 - cart[0, 1]
    >>> score, w = polar_fusion_weights(cart, [[0, 0]], multilabel=False)
    >>> fused = fuse_polar_slice(score[0], w[0] * cart[0], w[0], multilabel=False)
    >>> fused.argmax(0).tolist(), fused[1, 0, :2].tolist()
    ([[1, 1, 0, 0]], [1.0, 1.0])
    """
    mask = torch.as_tensor(hysteresis_fusion(score, low, high)[0], device=class_sum.device)
    mean = class_sum / weight_sum.clamp_min(1e-6)
    if multilabel:
        fused = torch.where(mask, mean, torch.zeros_like(mean))
        top, idx = fused.max(dim=0)
        lift = mask & (top <= 0.5)
        fused.scatter_(0, idx[None], torch.where(lift, torch.full_like(top, 0.5 + 1e-3), top)[None])
        return fused
    fg = mean[1:] / mean[1:].sum(dim=0, keepdim=True).clamp_min(1e-6)
    fused = torch.zeros_like(mean)
    fused[0] = (~mask).float()
    fused[1:] = torch.where(mask, fg, torch.zeros_like(fg))
    return fused


def fuse_polar_probabilities(cartesian, origins, multilabel: bool, low: float = 0.0, high: float = 0.4,
                             view_weights=None) -> torch.Tensor:
    """All polar predictions of one slice, (N, K, H, W) probabilities in Cartesian space with their
    origins (N, 2), fused into (K, H, W) probabilities (:func:`polar_fusion_weights` summed, then
    :func:`fuse_polar_slice`; ``view_weights`` (N,) as there). The predictor does the same sums
    over batches of origins.

    >>> cart = torch.zeros((2, 2, 1, 6)); cart[:, 1, 0, 1:3] = 0.8; cart[1, 1, 0, 4:6] = 0.9
    >>> cart[:, 0] = 1 - cart[:, 1]  # two views of one image, (N, K, H, W)
    >>> fused = fuse_polar_probabilities(cart, [[0, 1], [0, 1]], multilabel=False)
    >>> fused.argmax(0)[0].tolist()  # the object both views centre on stays, the other view's extra does not
    [0, 1, 1, 0, 0, 0]
    """
    p = torch.as_tensor(cartesian).float()
    score, class_weights = polar_fusion_weights(p, origins, multilabel, view_weights)
    return fuse_polar_slice(score.sum(axis=0), (class_weights[:, None] * p).sum(dim=0), class_weights.sum(dim=0),
                            multilabel, low, high)


__all__ = ["fuse_crops", "origin_component_weights", "hysteresis_fusion", "fuse_polar_predictions",
           "polar_fusion_weights", "fuse_polar_slice", "fuse_polar_probabilities"]
