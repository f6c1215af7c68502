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
from nnunet_stseg.core.geometry import (CropParams, FoundObjects, _box_slices, component_voxels, crop_and_resample,
                                        find_objects, foreground_from_probabilities, foreground_probability,
                                        nonlinearity, recall_proposals, segmented_confidence,
                                        upsample_probabilities, whole_image_boxes)

__all__ = ["CascadeResult", "segment_then_segment"]

FALLBACKS = ("coarse", "whole")
"""What a case without any object gets: the coarse probabilities, or one fine pass on the whole
image (one crop per slice for a 2D stage)."""


@dataclass
class CascadeResult:
    """What :func:`segment_then_segment` made of one case. ``probabilities`` (K, *shape) float16:
    the fused canvas (the coarse probabilities where no crop was fused). ``boxes`` (N, ndim, 2):
    the crops cut (the whole-image boxes with fallback ``whole``, none with ``coarse``);
    ``below`` (len(found.ids),): the objects that were recall-first proposals below the coarse
    decision; ``confidence`` (N,): the fine stage's :func:`segmented_confidence` per crop, when it
    was scored; ``rejected`` (N,): the proposals ``proposal_confirmation`` kept out of the fusion
    (None without that rule); ``fallback``: None, or what a case without objects got;
    ``n_extra``: proposals below the decision added to the argmax components; ``seconds``: the
    stages' seconds (``coarse_decision``, ``coarse_to_full_grid``, ``geometry``, and
    ``fine_network`` when a fine pass ran)."""

    probabilities: torch.Tensor
    found: FoundObjects
    boxes: np.ndarray
    below: np.ndarray
    fallback: str | None
    n_extra: int = 0
    confidence: np.ndarray | None = None
    rejected: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def segment_then_segment(coarse: torch.Tensor, image: torch.Tensor,
                         fine_forward: Callable[[torch.Tensor], torch.Tensor], crop: CropParams, *,
                         multilabel: bool, fine_spacing: Sequence[float],
                         rule_spacing: Sequence[float] | None = None,
                         fallback: str = "coarse", max_crops: int = 64, batch: int = 64, score: bool = False,
                         fine_dims: int = 3, clock: Callable[[], float] = time.perf_counter,
                         on_objects: Callable[[CascadeResult], None] | None = None,
                         free_memory: Callable[[], None] | None = None) -> CascadeResult:
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
    canvas = upsample_probabilities(coarse, shape, torch.float16, background_from_rest=not multilabel)
    t3 = clock()
    found = find_objects(proposals, fine_spacing, crop, rule_spacing=rule_spacing, image_shape=shape,
                         probabilities=canvas, multilabel=multilabel, decided=foreground if n_extra else None,
                         proposal_threshold=crop.proposal_threshold)
    below = found.below if n_extra else np.zeros(len(found.ids), bool)  # the kept proposals below the decision
    del proposals, foreground
    if free_memory is not None:
        free_memory()  # the box search's many small arrays, before the crops
    boxes = found.crop_boxes
    result = CascadeResult(canvas, found, boxes, below, None if len(boxes) else fallback, n_extra)
    # components below the size rule are noise: background. Outside every crop the probabilities
    # stay the coarse model's (the segmentation there is background either way; an ensemble
    # averages soft probabilities, not certainties). The kept objects' foreground lies in their
    # crops, which replace the canvas there.
    for component, box in zip(found.dropped_ids, found.dropped_boxes):
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
        result.seconds = {"coarse_decision": t1 - t0, "coarse_to_full_grid": t3 - t2,
                          "geometry": (t2 - t1) + clock() - t3}
        return result

    # 2. every crop, ``batch`` at a time (the bound is on memory, never on the result): cut from the
    # case -> fine pass -> pasted back and fused into the canvas
    two_d = fine_dims == 2
    # with proposal_confirmation, a proposal below the decision is fused only when the fine stage
    # segments it with confidence (the argmax objects always are)
    confirmation = crop.proposal_confirmation if result.fallback is None else None
    scored = result.fallback is None and (confirmation is not None or score)
    confidence = np.zeros(len(boxes))
    covered, fine_s = [], 0.0  # the boxes pasted so far (no full-size coverage mask)
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
        if confirmation is not None:
            keep = ~below[start:start + len(chunk)] | (confidence[start:start + len(chunk)] >= confirmation)
            probs, chunk = (probs, chunk) if keep.all() else (probs[torch.from_numpy(keep).to(probs.device)],
                                                              chunk[keep])
        if len(chunk):
            canvas, covered = fuse_crops(probs, chunk, shape, multilabel=multilabel, mode="linear", out=canvas,
                                         covered=covered)
        fine_s += tc - tb
        if free_memory is not None:
            free_memory()  # this batch's box-sized resamplings
    result.probabilities = canvas  # fuse_crops fused into it in place (out=canvas)
    if scored:
        result.confidence = confidence
        result.rejected = below & (confidence < confirmation) if confirmation is not None else None
    # geometry: boxes, crops, paste-back and fusion = everything but the networks and the canvas's upsampling
    result.seconds = {"coarse_decision": t1 - t0, "coarse_to_full_grid": t3 - t2,
                      "geometry": (t2 - t1) + (clock() - t3 - fine_s), "fine_network": fine_s}
    return result
