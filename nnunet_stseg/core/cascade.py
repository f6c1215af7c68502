"""The segment-then-segment cascade of one case, after the coarse network: coarse probabilities ->
objects -> crops -> fine passes -> fusion, as one function on torch tensors.

:func:`segment_then_segment` is the method itself; the fine network is a callable, so it runs
the same with nnU-Net's network (:class:`~nnunet_stseg.adapters.predictor.StSPredictor`, which
also runs the coarse model, logs, keeps the objects report and the stage timings) and with a
stand-in in a test. No nnU-Net import here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import (CropParams, FoundObjects, UpsampledProbabilities, _as_numpy, _box_slices,
                                        component_voxels, crop_and_resample, find_objects,
                                        foreground_from_probabilities, foreground_probability, nonlinearity,
                                        boxes_meet, overlap_groups, recall_proposals, segmented_confidence, slab_ranges,
                                        upsample_probabilities, whole_image_boxes)

__all__ = ["CascadeResult", "segment_then_segment"]

FALLBACKS = ("coarse", "whole")
"""What a case without any object gets: the coarse probabilities, or one fine pass on the whole
image (one crop per slice for a 2D stage)."""


@dataclass
class CascadeResult:
    """What :func:`segment_then_segment` made of one case. ``probabilities`` (K, *shape) float16:
    the fused canvas (the coarse probabilities where no crop was fused); None when only the label
    map was asked for (``to_labels``): then ``labels`` (*shape) numpy, integer. ``boxes`` (N, ndim, 2):
    the crops cut (the whole-image boxes with fallback ``whole``, none with ``coarse``);
    ``below`` (len(found.ids),): the objects that were recall-first proposals below the coarse
    decision; ``confidence`` (N,): the fine stage's :func:`segmented_confidence` per crop, when it
    was scored; ``rejected`` (N,): the proposals ``proposal_confirmation`` kept out of the fusion
    (None without that rule); ``fallback``: None, or what a case without objects got;
    ``n_extra``: proposals below the decision added to the argmax components; ``seconds``: the
    stages' seconds (``coarse_decision``, ``coarse_to_full_grid``, ``geometry``, ``fine_network``
    when a fine pass ran, ``to_labels`` with ``to_labels``)."""

    probabilities: torch.Tensor | None
    found: FoundObjects
    boxes: np.ndarray
    below: np.ndarray
    fallback: str | None
    n_extra: int = 0
    confidence: np.ndarray | None = None
    rejected: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    labels: np.ndarray | None = None


def segment_then_segment(coarse: torch.Tensor, image: torch.Tensor,
                         fine_forward: Callable[[torch.Tensor], torch.Tensor], crop: CropParams, *,
                         multilabel: bool, fine_spacing: Sequence[float],
                         rule_spacing: Sequence[float] | None = None,
                         fallback: str = "coarse", max_crops: int = 64, batch: int = 64, score: bool = False,
                         fine_dims: int = 3, clock: Callable[[], float] = time.perf_counter,
                         on_objects: Callable[[CascadeResult], None] | None = None,
                         free_memory: Callable[[], None] | None = None,
                         to_labels: Callable[[torch.Tensor], torch.Tensor | np.ndarray] | None = None) -> CascadeResult:
    """One case through the cascade after the coarse network.

    ``coarse`` (K, *grid): the coarse model's probabilities (softmax, channel 0 = background, or
    sigmoid regions with ``multilabel``) on its own grid or on the full grid; ``image`` (C, *shape)
    float32: the case on the full grid; ``fine_forward``: crops (N, C, *patch) -> logits (N, K,
    *patch) float32 on the crops' device (with ``fine_dims`` 2, a 2D network: crops (N, C, S, S) of
    patch ``(1, S, S)``, logits (N, K, S, S)).

    1. Objects: the coarse argmax components on the coarse grid (plus recall-first proposals,
       ``crop.proposal_threshold``, at most ``max_crops``), tight boxes read off the coarse
       probabilities linearly upsampled to the full grid (the canvas, float16), components below
       the size rule (judged on ``rule_spacing``, else ``fine_spacing``) made background there.
    2. No object: ``fallback`` ``coarse`` returns the canvas, ``whole`` cuts whole-image boxes.
    3. ``batch`` crops at a time: cut from ``image``, resampled to ``crop.patch_size``, the fine
       network, its nonlinearity, pasted back and fused into the canvas (:func:`fuse_crops`: the
       first crop over a voxel replaces the coarse probabilities there, later ones are OR-ed in).
       With ``crop.proposal_confirmation`` a proposal below the decision is fused only when the
       fine stage is confident of it; ``score`` computes the confidence anyway (a report).

    ``to_labels`` (probabilities (K, *region) float16 -> labels (*region), the export's own
    conversion): only the label map is wanted (no probabilities are exported). Then no full-size
    probability canvas is made: the box search reads the coarse probabilities' upsampling box by box
    (:class:`UpsampledProbabilities`, the canvas's values bit for bit), the crops are fused per group
    of overlapping crops on a canvas of the group's bounding box (:func:`overlap_groups`), converted
    there and written into a background label map (``result.labels``); the same labels as the canvas
    converted as a whole (outside every crop the canvas says background: the foreground of every kept
    component lies inside its crop, and the dropped ones are made background). A case that falls back
    to the coarse prediction still makes its canvas (then converts it). Work per crop in proportion to
    the crop.

    ``on_objects(result)`` is called once the crops are known, before any fine pass (``result``
    without confidence and seconds yet); ``free_memory()`` where the geometry has just dropped
    many small arrays (after the box search, after each batch); ``clock`` times the stages.

    >>> mask = torch.zeros(1, 1, 32, 32); mask[0, 0, 8:14, 10:18] = 1.0; mask[0, 0, 25:27, 25:27] = 1.0
    >>> coarse = torch.cat([1 - mask, mask])  # (K, 1, 32, 32): an oracle coarse model on the full grid
    >>> sure = lambda crops: torch.cat([crops < 0.5, crops >= 0.5], 1).float() * 20 - 10  # crops' mask
    >>> out = segment_then_segment(coarse, mask, sure, CropParams(patch_size=(1, 16, 16)), multilabel=False,
    ...                            fine_spacing=[1.0, 1.0, 1.0], fine_dims=2)
    >>> out.boxes.tolist(), out.found.n_dropped  # one object (the 2 x 2 speck is below 5 voxels)
    ([[[0, 1], [3, 19], [6, 22]]], 1)
    >>> segmented = foreground_from_probabilities(out.probabilities, False)  # (1, 32, 32)
    >>> bool((segmented == (mask[0] > 0)).all()), int(segmented.sum()), out.fallback  # the speck: background
    (False, 48, None)
    >>> bool(segmented[0, 8:14, 10:18].all()), int(segmented[0, 25:27, 25:27].sum())
    (True, 0)
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    shape = tuple(image.shape[1:])
    t0 = clock()
    foreground = foreground_from_probabilities(coarse, multilabel)
    t1 = clock()

    # 1. objects: connected components ON THE COARSE GRID (the argmax, and with recall-first
    # proposals the regions the coarse model saw below its decision), boxes on the full grid
    low = foreground_probability(coarse, multilabel) if crop.proposal_threshold is not None else None
    proposals, n_extra = recall_proposals(foreground, low, crop.proposal_threshold, crop.active, max_extra=max_crops)
    del low
    # the canvas: the coarse probabilities on the full grid, in half precision (as nnU-Net's own
    # logits), the only K x volume array of the case; the objects' tight boxes are read off it
    t2 = clock()
    lazy = to_labels is not None
    canvas = (UpsampledProbabilities if lazy else upsample_probabilities)(
        coarse, shape, torch.float16, background_from_rest=not multilabel)
    t3 = clock()
    found = find_objects(proposals, fine_spacing, crop, rule_spacing=rule_spacing, image_shape=shape,
                         probabilities=canvas, multilabel=multilabel, decided=foreground if n_extra else None,
                         proposal_threshold=crop.proposal_threshold)
    below = found.below if n_extra else np.zeros(len(found.ids), bool)  # the kept proposals below the decision
    del proposals, foreground
    if free_memory is not None:
        free_memory()  # the box search's many small arrays, before the crops
    boxes = found.crop_boxes
    t_canvas = 0.0
    if lazy and len(boxes) == 0 and fallback == "coarse":  # the coarse prediction is the result: its canvas
        t4 = clock()
        canvas = upsample_probabilities(coarse, shape, torch.float16, background_from_rest=not multilabel)
        t_canvas = clock() - t4
    result = CascadeResult(None if lazy else canvas, found, boxes, below, None if len(boxes) else fallback, n_extra)
    # components below the size rule are noise: background. Outside every crop the probabilities
    # stay the coarse model's (the segmentation there is background either way; an ensemble
    # averages soft probabilities, not certainties). The kept objects' foreground lies in their
    # crops, which replace the canvas there.
    for component, box in zip(found.dropped_ids if isinstance(canvas, torch.Tensor) else (),
                              found.dropped_boxes):
        region = canvas[(slice(None), *_box_slices(box))]
        noise = torch.as_tensor(component_voxels(canvas, found.labels, component, box, multilabel),
                                device=canvas.device)
        region[:, noise] = 0.0
        if not multilabel:
            region[0, noise] = 1.0
    if len(boxes) == 0:
        if result.fallback == "whole":
            result.boxes = boxes = whole_image_boxes(shape, crop.active)
    if on_objects is not None:
        on_objects(result)
    if len(boxes) == 0:  # fallback 'coarse'
        t5 = clock()
        if lazy:
            result.labels = _as_numpy(to_labels(canvas))
            del canvas
        result.seconds = {"coarse_decision": t1 - t0, "coarse_to_full_grid": t3 - t2 + t_canvas,
                          "geometry": (t2 - t1) + t5 - t3 - t_canvas,
                          **({"to_labels": clock() - t5} if lazy else {})}
        return result

    # 2. every crop, ``batch`` at a time (the bound is on memory, never on the result): cut from the
    # case -> fine pass -> pasted back and fused into the canvas
    two_d = fine_dims == 2
    # with proposal_confirmation, a proposal below the decision is fused only when the fine stage
    # segments it with confidence (the argmax objects always are)
    confirmation = crop.proposal_confirmation if result.fallback is None else None
    scored = result.fallback is None and (confirmation is not None or score)
    confidence = np.zeros(len(boxes))
    covered, fine_s, labels_s = [], 0.0, 0.0  # the boxes pasted so far (no full-size coverage mask)
    if lazy:
        groups = _CropGroups(boxes, shape, canvas.shape[0], coarse.device, to_labels, multilabel)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        crops = crop_and_resample(image, chunk, crop.patch_size, "linear")
        crops = crops[:, :, 0] if two_d else crops
        tb = clock()
        fine_logits = fine_forward(crops)  # (N, K, ...): nonlinearity over the channel axis 1
        tc = clock()
        probs = nonlinearity(fine_logits, multilabel)
        probs = probs[:, :, None] if two_d else probs
        if scored:
            confidence[start:start + len(chunk)] = segmented_confidence(probs, multilabel).cpu().numpy()
        keep = np.ones(len(chunk), bool)
        if confirmation is not None:
            keep = ~below[start:start + len(chunk)] | (confidence[start:start + len(chunk)] >= confirmation)
            probs, chunk = (probs, chunk) if keep.all() else (probs[torch.from_numpy(keep).to(probs.device)],
                                                              chunk[keep])
        if lazy:
            labels_s += groups.fuse(probs, np.arange(start, start + len(keep))[keep], start + len(keep), clock)
        elif len(chunk):
            canvas, covered = fuse_crops(probs, chunk, shape, multilabel=multilabel, mode="linear", out=canvas,
                                         covered=covered)
        fine_s += tc - tb
        if free_memory is not None:
            free_memory()  # this batch's box-sized resamplings
    if lazy:
        result.labels = groups.labels
    else:
        result.probabilities = canvas  # fuse_crops fused into it in place (out=canvas)
    if scored:
        result.confidence = confidence
        result.rejected = below & (confidence < confirmation) if confirmation is not None else None
    # geometry: boxes, crops, paste-back and fusion = everything but the networks, the canvas's
    # upsampling and the conversion to labels
    result.seconds = {"coarse_decision": t1 - t0, "coarse_to_full_grid": t3 - t2,
                      "geometry": (t2 - t1) + (clock() - t3 - fine_s - labels_s), "fine_network": fine_s,
                      **({"to_labels": labels_s} if lazy else {})}
    return result


GROUP_SLAB_VOXELS = 1 << 23
"""Voxels of one slab of a group's bounding box when its crops are fused into labels (8 M: a
two-class float32 canvas of 64 MiB): a group of crops as large as the volume costs a slab."""

LABEL_CHUNK_VOXELS = 1 << 21
"""Voxels of a fused slab rounded to half precision and converted to labels at a time (2 M)."""


class _CropGroups:
    """The label map of a case built from its crops without a full-size probability canvas: the
    crops of each group of overlapping crops (:func:`overlap_groups`) are kept (patch-sized) until
    the group's last crop is in; then the group's bounding box is fused a slab of
    :data:`GROUP_SLAB_VOXELS` at a time (the same fusion, in the same order, as on the full canvas,
    the same half-precision values), converted by ``to_labels``, and its foreground written into the
    background label map. No array of the group's (or the volume's) size but the label map."""

    def __init__(self, boxes: np.ndarray, shape: tuple[int, ...], k: int, device, to_labels, multilabel: bool):
        self.boxes, self.shape, self.k, self.device = boxes, shape, k, device
        self.to_labels, self.multilabel = to_labels, multilabel
        self.group = overlap_groups(boxes)
        n = int(self.group.max()) + 1 if len(boxes) else 0
        self.hull = np.stack([np.stack([boxes[self.group == g, :, 0].min(0), boxes[self.group == g, :, 1].max(0)], -1)
                              for g in range(n)]) if n else np.zeros((0, len(shape), 2), np.int64)
        self.last = np.array([np.flatnonzero(self.group == g).max() for g in range(n)], np.int64)
        self.pending: dict[int, list[tuple[torch.Tensor, int]]] = {}  # group -> its crops so far, in order
        # the background label (and the labels' dtype): the conversion of certain background
        probe = torch.zeros((k, *(1,) * len(shape)), dtype=torch.float16, device=device)
        if not multilabel:
            probe[0] = 1.0
        background = _as_numpy(to_labels(probe))
        self.background = background.reshape(-1)[0]
        # zeros: pages the kernel maps on first write (the label map is mostly background)
        self.labels = (np.zeros(shape, background.dtype) if self.background == 0
                       else np.full(shape, self.background, dtype=background.dtype))

    def fuse(self, probs: torch.Tensor, indices: np.ndarray, done: int, clock) -> float:
        """Keep crops ``indices`` (their probabilities ``probs`` (n, K, *patch)); then fuse and
        convert every group whose last crop is below ``done``. Returns the seconds spent converting
        to labels."""
        for p, i in zip(probs, indices):
            self.pending.setdefault(int(self.group[i]), []).append((p, int(i)))
        seconds = 0.0
        for g in [g for g in self.pending if self.last[g] < done]:
            seconds += self._close(g, self.pending.pop(g), clock)
        return seconds

    def _close(self, g: int, crops: list[tuple[torch.Tensor, int]], clock) -> float:
        """Fuse group ``g``'s crops slab by slab on a canvas of certain background (the OR of
        probabilities in [0, 1] with certain background is the crop itself: the first crop over a
        voxel replaces the canvas, with no coverage mask), convert, and write the foreground: a voxel
        of the group's bounding box that no crop of the group covers converts to background, and no
        other group's crop covers a voxel this group's crops cover."""
        hull = self.hull[g]
        size = hull[:, 1] - hull[:, 0]
        seconds = 0.0
        slabs = slab_ranges(int(size[0]), int(np.prod(size[1:])), GROUP_SLAB_VOXELS)
        # The slab is fused in float32 and rounded to half precision once, before the conversion:
        # the OR is a min / max, which commutes with rounding, so these are the half canvas's values
        # bit for bit, without mixed-precision arithmetic for every crop. One buffer of each for
        # every slab (a fresh large array costs its page faults every slab).
        plane = int(np.prod(size[1:]))
        longest = max(b - a for a, b in slabs)
        fused = torch.empty(self.k * longest * plane, dtype=torch.float32, device=self.device)
        chunks = slab_ranges(longest, plane, LABEL_CHUNK_VOXELS)
        half = torch.empty(self.k * max(b - a for a, b in chunks) * plane, dtype=torch.float16, device=self.device)
        for a, b in slabs:
            window = hull.copy()
            window[0] = (hull[0, 0] + a, hull[0, 0] + b)
            shape = (self.k, *(int(v) for v in window[:, 1] - window[:, 0]))
            canvas = fused[:int(np.prod(shape))].view(shape)
            canvas.zero_()
            if not self.multilabel:
                canvas[0] = 1.0
            earlier: list[np.ndarray] = []
            for p, i in crops:
                box = self.boxes[i]
                if not (box[0, 0] < window[0, 1] and box[0, 1] > window[0, 0]):
                    continue  # outside this slab
                # a crop that meets no earlier one is copied in (an empty list of pasted boxes);
                # else OR-ed with the canvas everywhere (no coverage)
                fuse_crops(p[None], box[None], self.shape, multilabel=self.multilabel, mode="linear", coverage=False,
                           covered=None if boxes_meet(box, earlier) else [], out=canvas, window=window)
                earlier.append(box)
            t0 = clock()
            for c0, c1 in slab_ranges(b - a, plane, LABEL_CHUNK_VOXELS):
                part = canvas[:, c0:c1]
                labels = _as_numpy(self.to_labels(half[:part.numel()].view(part.shape).copy_(part)))
                chunk = window.copy()
                chunk[0] = (window[0, 0] + c0, window[0, 0] + c1)
                np.copyto(self.labels[_box_slices(chunk)], labels, where=labels != self.background)
            seconds += clock() - t0
            del canvas, labels
        return seconds
