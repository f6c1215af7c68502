"""The end-to-end crop-guided network (seed 003, section 5.2; ``../shared/docs/methods.md`` section 2).

One model holds two segmentation modules of the same architecture: the coarse module sees the
whole image downscaled to the module size m; a box is taken from its foreground mask (one box
around ALL of it, the thesis's rule, or one box per connected component, the cascade's); the
full-resolution image inside the box, resampled to m, and the coarse foreground probability of the
same region are the fine module's input (C + 1 channels). Its output, pasted back onto the box, is
the model's prediction.

Gradient: the crop is an affine ``grid_sample`` of the image and of the coarse probability map, so
the fine loss reaches the coarse module through the probability channel. It does NOT flow through
the box coordinates: the box is read off a thresholded mask (argmax, then extents), a piecewise
constant function of the coarse output whose derivative is zero almost everywhere (the thesis's box
is the same). Why not a soft box: a differentiable box (e.g. probability-weighted moments) would be
a different method, and the probability channel already carries the localisation signal.

Everything here is torch on the tensors' device (boxes are small numpy arrays on the host), with no
nnU-Net import. Images are (C, *spatial) with 2 or 3 spatial axes; boxes are (N, ndim, 2) in voxel
coordinates of the image they are cut from ([start, stop) per axis, may be fractional).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_stseg.core.geometry import (CropParams, crop_and_resample, downscale, find_objects,
                                        foreground_from_probabilities, foreground_probability, nonlinearity,
                                        square_and_pad, whole_image_boxes)

BOX_RULES = ("all", "objects")


def scale_boxes(boxes: np.ndarray, from_shape: Sequence[int], to_shape: Sequence[int]) -> np.ndarray:
    """Boxes (N, ndim, 2) on a grid of ``from_shape`` expressed on a grid of ``to_shape`` covering
    the same field of view (the coarse and the full-resolution grid of one image).

    >>> scale_boxes(np.array([[[1, 2], [0, 4]]]), (4, 4), (16, 8)).tolist()
    [[[4.0, 8.0], [0.0, 8.0]]]
    """
    f = np.asarray(to_shape, dtype=float) / np.asarray(from_shape, dtype=float)
    return np.asarray(boxes, dtype=float) * f[None, :, None]


def box_around_all(mask: np.ndarray, image_shape: Sequence[int], spacing: Sequence[float],
                   params: CropParams) -> np.ndarray:
    """The thesis's box: one box (1, ndim, 2) around ALL foreground of the coarse ``mask`` (on the
    coarse grid), on the image grid of ``image_shape``, widened by the cascade's context margin
    (``params.margin_fraction`` of its longer side, at least ``margin_min`` voxels; not squared)
    and clipped to the image; the whole image when the mask is empty. Integer voxels.

    >>> mask = np.zeros((8, 8), bool); mask[2:4, 2:6] = True  # coarse 8 x 8 of a 32 x 32 image
    >>> box_around_all(mask, (32, 32), (1.0, 1.0), CropParams(patch_size=(8, 8), margin_min=2)).tolist()
    [[[6, 18], [6, 26]]]
    >>> box_around_all(np.zeros((8, 8), bool), (32, 32), (1.0, 1.0), CropParams(patch_size=(8, 8))).tolist()
    [[[0, 32], [0, 32]]]
    """
    image_shape = np.asarray(image_shape, dtype=np.int64)
    ndim = len(image_shape)
    if not mask.any():
        return whole_image_boxes(image_shape, [True] * ndim)
    idx = np.nonzero(mask)
    tight = np.array([[i.min(), i.max() + 1] for i in idx], dtype=float)[None]
    tight = scale_boxes(tight, mask.shape, image_shape)
    unsquared = CropParams(**{**params.to_dict(), "patch_size": params.patch_size[-ndim:], "square": False})
    centre, size = square_and_pad(tight, spacing, unsquared)
    lo = np.clip(np.floor(centre - size / 2), 0, image_shape[None])
    hi = np.clip(np.ceil(centre + size / 2), 0, image_shape[None])
    return np.stack([lo, np.maximum(hi, lo + 1)], axis=-1).astype(np.int64)


def boxes_per_object(mask: np.ndarray, image_shape: Sequence[int], spacing: Sequence[float],
                     params: CropParams) -> np.ndarray:
    """The cascade's boxes (N, ndim, 2) on the image grid: the coarse ``mask``'s components
    (nearest-upsampled to ``image_shape``) through :func:`~nnunet_stseg.core.geometry.find_objects`
    (size rule, squared in mm, padded, fitted to the image); the whole image when none is kept.

    >>> mask = np.zeros((8, 8), bool); mask[2:4, 2:4] = mask[6:8, 6:8] = True
    >>> boxes_per_object(mask, (32, 32), (1.0, 1.0), CropParams(patch_size=(8, 8))).tolist()
    [[[4, 20], [4, 20]], [[16, 32], [16, 32]]]
    """
    image_shape = tuple(int(s) for s in image_shape)
    full = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=image_shape, mode="nearest")[0, 0] > 0
    boxes = find_objects(full.numpy(), spacing, CropParams(**{**params.to_dict(),
                                                              "patch_size": params.patch_size[-len(image_shape):]}))
    if len(boxes.crop_boxes) == 0:
        return whole_image_boxes(image_shape, [True] * len(image_shape))
    return boxes.crop_boxes


def image_boxes(mask: np.ndarray, image_shape: Sequence[int], spacing: Sequence[float], params: CropParams,
                rule: str) -> np.ndarray:
    """The boxes of one image under ``rule`` (``all``: :func:`box_around_all`, ``objects``:
    :func:`boxes_per_object`).

    >>> mask = np.zeros((8, 8), bool); mask[2:4, 2:6] = True  # coarse 8 x 8 of a 32 x 32 image
    >>> image_boxes(mask, (32, 32), (1.0, 1.0), CropParams(patch_size=(8, 8), margin_min=2), "all").tolist()
    [[[6, 18], [6, 26]]]
    >>> image_boxes(mask, (32, 32), (1.0, 1.0), CropParams(patch_size=(8, 8)), "largest")
    Traceback (most recent call last):
    ValueError: box rule must be one of ('all', 'objects'), got 'largest'
    """
    if rule not in BOX_RULES:
        raise ValueError(f"box rule must be one of {BOX_RULES}, got {rule!r}")
    fn = box_around_all if rule == "all" else boxes_per_object
    return fn(mask, image_shape, spacing, params)


def fine_inputs(image: torch.Tensor, coarse_foreground: torch.Tensor, boxes: np.ndarray,
                size: Sequence[int]) -> torch.Tensor:
    """The fine module's input (N, C + 1, *size) for the boxes (N, ndim, 2) of ONE image
    (C, *spatial): the image inside each box resampled to ``size`` (linear) and the coarse
    foreground probability (*coarse_spatial) of the same region (linear, from the coarse grid: the
    same affine map, as both grids cover the same field of view). Differentiable in both inputs:
    gradient reaches the coarse module through the second part.

    >>> image = torch.arange(16.0).reshape(1, 4, 4); coarse = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    >>> x = fine_inputs(image, coarse, np.array([[[0, 2], [2, 4]]]), (2, 2))
    >>> x[0, 0].tolist(), x[0, 1].tolist()  # the top-right quarter of both (coarse: linear, 1 inside)
    ([[2.0, 3.0], [6.0, 7.0]], [[0.75, 1.0], [0.75, 1.0]])
    """
    spatial = tuple(image.shape[1:])
    crops = crop_and_resample(image, boxes, size, "linear")
    coarse_boxes = scale_boxes(boxes, spatial, tuple(coarse_foreground.shape))
    prob = crop_and_resample(coarse_foreground[None], coarse_boxes, size, "linear")
    return torch.cat([crops, prob.to(crops.dtype)], dim=1)


def widen_input_weights(pretrained: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """``pretrained`` (a state dict of a network with C input channels) as a state dict for
    ``target``, the same architecture with C + k input channels: tensors whose shape differs only in
    the input-channel axis (the first convolution) get the pretrained weights for the first C
    channels and ZERO for the k new ones, so ``target`` computes exactly what the pretrained network
    does whatever the new channels hold. Any other mismatch is an error naming the key.

    >>> net = nn.Conv2d(2, 3, 1); wide = nn.Conv2d(3, 3, 1)
    >>> sd = widen_input_weights(net.state_dict(), wide)
    >>> bool(sd["weight"][:, 2].abs().sum() == 0), bool(torch.equal(sd["weight"][:, :2], net.weight))
    (True, True)
    """
    out = {}
    for key, value in target.state_dict().items():
        if key not in pretrained:
            raise KeyError(f"pretrained weights have no '{key}' (another architecture?)")
        src = pretrained[key]
        if src.shape == value.shape:
            out[key] = src.clone()
        elif src.ndim == value.ndim and src.ndim >= 2 and src.shape[0] == value.shape[0] \
                and src.shape[2:] == value.shape[2:] and src.shape[1] < value.shape[1]:
            w = torch.zeros_like(value)
            w[:, :src.shape[1]] = src
            out[key] = w
        else:
            raise ValueError(f"pretrained '{key}' has shape {tuple(src.shape)}, the network needs {tuple(value.shape)}")
    return out


class CropGuidedOutput(NamedTuple):
    """What a crop-guided model returns for a batch of B images: the first stage's logits (B, K, *m),
    the fine logits (N, K, *m) of every crop and each image's boxes (a list of B arrays (n_b, ndim, 2)
    on the image grid, N = sum of n_b, crops in that order; fractional for L-SNet's RoIs), and,
    for L-SNet, L-Net's whole output (:class:`~nnunet_stseg.core.lsnet.LocalisationOutput`)."""

    coarse: torch.Tensor
    fine: torch.Tensor
    boxes: list
    localisation: object = None


class CropGuidedNetwork(nn.Module):
    """The end-to-end model: two modules (state dict keys ``coarse.*`` and ``fine.*``, one
    checkpoint) joined by the crop. ``module_size``: the input size m of both modules (the coarse
    configuration's patch); ``spacing`` (of the image grid), ``crop`` and ``rule`` make the boxes;
    ``multilabel``: sigmoid (region) outputs instead of softmax.

    ``forward`` on a batch of same-size images (B, C, *spatial) runs the whole model and returns a
    :class:`CropGuidedOutput`. In training mode each image contributes ONE box, drawn at random among
    its boxes (numpy's global generator, seeded per worker like nnU-Net's loaders; the cascade's
    fine stage also trains on one object per sample); in eval mode all of them.

    >>> net = CropGuidedNetwork(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), (4, 4), (1.0, 1.0),
    ...                         CropParams(patch_size=(4, 4)), "all")
    >>> out = net(torch.rand(2, 1, 16, 16))
    >>> out.coarse.shape, out.fine.shape, [b.shape for b in out.boxes]
    (torch.Size([2, 2, 4, 4]), torch.Size([2, 2, 4, 4]), [(1, 2, 2), (1, 2, 2)])
    """

    def __init__(self, coarse: nn.Module, fine: nn.Module, module_size: Sequence[int], spacing: Sequence[float],
                 crop: CropParams, rule: str = "all", multilabel: bool = False):
        super().__init__()
        if rule not in BOX_RULES:
            raise ValueError(f"box rule must be one of {BOX_RULES}, got {rule!r}")
        self.coarse = coarse
        self.fine = fine
        self.module_size = tuple(int(s) for s in module_size)
        self.spacing = tuple(float(s) for s in spacing)
        self.crop = crop
        self.rule = rule
        self.multilabel = multilabel

    def foreground(self, coarse_logits: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Foreground probability (B, *m), differentiable, and the coarse decision (B, *m) bool on
        the host (argmax != background, or a region above 0.5, as nnU-Net decides)."""
        probs = nonlinearity(coarse_logits, self.multilabel).transpose(0, 1)  # (K, B, *m): channels first
        with torch.no_grad():
            mask = foreground_from_probabilities(probs, self.multilabel)
        return foreground_probability(probs, self.multilabel), mask.cpu().numpy()

    def forward(self, images: torch.Tensor) -> CropGuidedOutput:
        coarse_logits = self.coarse(downscale(images, self.module_size))
        fg, mask = self.foreground(coarse_logits)
        spatial = tuple(images.shape[2:])
        inputs, all_boxes = [], []
        for b in range(images.shape[0]):
            boxes = image_boxes(mask[b], spatial, self.spacing, self.crop, self.rule)
            if self.training and len(boxes) > 1:
                boxes = boxes[np.random.randint(len(boxes))][None]
            all_boxes.append(boxes)
            inputs.append(fine_inputs(images[b], fg[b], boxes, self.module_size).to(images.dtype))
        return CropGuidedOutput(coarse_logits, self.fine(torch.cat(inputs)), all_boxes)

    def init_from_pretrained(self, pretrained: dict[str, torch.Tensor]) -> None:
        """Both modules from one network trained on downscaled images (the thesis's initialisation):
        the coarse module gets its weights, the fine module too with zero weight on its extra
        (coarse probability) input channel, so at the start the fine module is that network."""
        self.coarse.load_state_dict(pretrained)
        self.fine.load_state_dict(widen_input_weights(pretrained, self.fine))


def crop_targets(labels: torch.Tensor, boxes: list[np.ndarray], size: Sequence[int]) -> torch.Tensor:
    """Label maps (B, 1, *spatial) cut at each image's boxes and resampled (nearest) to ``size``:
    (N, 1, *size), in the order of :class:`CropGuidedOutput`'s fine logits.

    >>> labels = torch.zeros(1, 1, 4, 4); labels[0, 0, :2, 2:] = 1
    >>> crop_targets(labels, [np.array([[[0, 2], [2, 4]]])], (2, 2))[0, 0].tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    return torch.cat([crop_and_resample(labels[b].float(), bx, size, "nearest") for b, bx in enumerate(boxes)])



class CropGuidedLoss(nn.Module):
    """The end-to-end model's loss on a :class:`CropGuidedOutput` and the label map (B, L, *spatial)
    of the image grid: ``fine_weight`` x ``loss(fine logits, label cut at each box, resampled to m)``
    + ``coarse_weight`` x ``loss(coarse logits, label downscaled to m)`` (nearest: label values, the
    ignore label included, stay what they are). ``loss`` is any segmentation loss on (logits,
    label), e.g. nnU-Net's Dice + CE. The coarse term keeps the coarse module a localiser.

    >>> out = CropGuidedOutput(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), [np.array([[[0, 2], [0, 2]]])])
    >>> loss = CropGuidedLoss(lambda logits, label: label.float().mean(), coarse_weight=0.5)
    >>> labels = torch.zeros(1, 1, 4, 4); labels[0, 0, :2, :2] = 1  # the box holds only foreground
    >>> float(loss(out, labels))  # 1 x 1.0 (the crop) + 0.5 x 0.25 (the downscaled image)
    1.125
    """

    def __init__(self, loss, coarse_weight: float = 1.0, fine_weight: float = 1.0):
        super().__init__()
        self.loss = loss
        self.coarse_weight = float(coarse_weight)
        self.fine_weight = float(fine_weight)

    def forward(self, output: CropGuidedOutput, labels: torch.Tensor) -> torch.Tensor:
        size = tuple(output.fine.shape[2:])
        total = self.fine_weight * self.loss(output.fine, crop_targets(labels, output.boxes, size))
        if self.coarse_weight > 0:
            coarse_labels = F.interpolate(labels.float(), size=tuple(output.coarse.shape[2:]), mode="nearest")
            total = total + self.coarse_weight * self.loss(output.coarse, coarse_labels)
        return total


__all__ = ["BOX_RULES", "CropGuidedLoss", "CropGuidedNetwork", "CropGuidedOutput", "box_around_all", "boxes_per_object",
           "crop_targets", "downscale", "fine_inputs", "image_boxes", "scale_boxes",
           "widen_input_weights"]
