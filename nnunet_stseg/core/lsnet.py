"""L-SNet: a detection first stage and a differentiable RoI recalibration (seed 001; methods.md section 5).

L-Net is an encoder-decoder on the whole image downscaled to its input size m with two heads on
a decoder feature map of stride s (4 in the paper): a keypoint heatmap (a Gaussian of standard
deviation ``sigma`` cells at each object's box centre) and a box head regressing, at every cell,
the distances from the cell's centre to the box's four edges (two 3x3 convolutions then one
13x13, the paper's head). A keypoint plus its distances is a box; the box plus a margin is
resampled from the FULL-resolution image to the S-Net patch by bilinear ``grid_sample`` (the
paper's RoI recalibration: an affine map, no quantised crop); the S-Net output goes back onto the
box by the inverse map (:func:`~nnunet_stseg.core.fusion.fuse_crops` with fractional boxes).

Gradient: the RoI's sampling grid is a differentiable function of the regressed distances, so the
S-Net loss reaches L-Net's box head; :func:`scale_gradient` multiplies that gradient by ``gamma``
(the paper's decay factor; 0 = none at all, the parameters are then not touched by the S-Net loss).

Conventions: 2D. Feature cell (i, j) covers input pixels [i s, (i + 1) s) x [j s, (j + 1) s), its
centre at ((i + 0.5) s, (j + 0.5) s) in continuous pixel coordinates (pixel k covers [k, k + 1));
boxes are (N, 2, 2) ``[start, stop)`` per axis (y, x) in those coordinates, fractional; distances
are (4, h, w) = (to y start, to y stop, to x start, to x stop) in cells. Pure torch/numpy/scipy, no
nnU-Net import; everything on the tensors' device except the small keypoint arrays.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from nnunet_stseg.core.crop_guided import CropGuidedOutput, downscale
from nnunet_stseg.core.geometry import component_boxes, crop_and_resample

FALLBACKS = ("empty", "best", "whole")
PAPER_MARGIN_FRACTION = 15 / 512  # the paper's 15 px margin at 512 x 512, as a fraction of the image side


KEYPOINT_PRIOR_BIAS = -2.19  # CenterNet: a heatmap logit starts at sigmoid(-2.19) = 0.1


class LocalisationTargets(NamedTuple):
    """Targets of one batch on L-Net's feature grid: ``heatmap`` (B, 1, h, w) in [0, 1] (exactly 1
    at each object's centre cell), ``distances`` (B, 4, h, w) in cells, ``positive`` (B, 1, h, w)
    bool (where the box loss applies: heatmap >= 0.5, the paper's indicator) and ``boxes``, a list
    of B arrays (n_b, 2, 2) on the input grid."""

    heatmap: torch.Tensor
    distances: torch.Tensor
    positive: torch.Tensor
    boxes: list


class LocalisationOutput(NamedTuple):
    """L-Net's output: ``heatmap`` logits (B, 1, h, w) and non-negative ``distances`` (B, 4, h, w) in cells."""

    heatmap: torch.Tensor
    distances: torch.Tensor


def object_boxes(foreground: np.ndarray) -> np.ndarray:
    """Tight boxes (N, 2, 2) of the 8-connected components of a 2D mask, [start, stop) per axis.

    >>> m = np.zeros((8, 8), bool); m[1:3, 2:5] = True; m[6, 6] = True
    >>> object_boxes(m).tolist()
    [[[1, 3], [2, 5]], [[6, 7], [6, 7]]]
    """
    return component_boxes(np.asarray(foreground, bool), [True, True])[1]


def localisation_targets(foreground: torch.Tensor, stride: int, sigma: float,
                         positive_threshold: float = 0.5) -> LocalisationTargets:
    """Heatmap, distance and positive-cell targets for foreground masks (B, 1, H, W) or (B, H, W)
    on L-Net's input grid. Each object (8-connected component) puts a Gaussian (peak 1, ``sigma``
    cells) on the cell holding its box centre; where objects overlap the larger value wins, and the
    distances at a cell are those of the object that won it.

    >>> fg = torch.zeros(1, 8, 8, dtype=torch.bool); fg[0, 0:4, 2:6] = True  # stride 2 -> a 4 x 4 grid
    >>> t = localisation_targets(fg, stride=2, sigma=1.0)
    >>> t.heatmap.shape, float(t.heatmap[0, 0, 1, 2]), t.distances[0, :, 1, 2].tolist()  # centre (2, 4) -> cell (1, 2)
    (torch.Size([1, 1, 4, 4]), 1.0, [1.5, 0.5, 1.5, 0.5])
    """
    fg = foreground[:, 0] if foreground.ndim == 4 else foreground
    b, height, width = fg.shape
    h, w = math.ceil(height / stride), math.ceil(width / stride)
    device = fg.device
    heat = torch.zeros((b, 1, h, w), device=device)
    dist = torch.zeros((b, 4, h, w), device=device)
    cy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride  # cell centres, input pixels
    cx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    all_boxes = []
    for i, mask in enumerate(fg.detach().cpu().numpy() > 0):
        boxes = object_boxes(mask)
        all_boxes.append(boxes)
        for (y0, y1), (x0, x1) in boxes.astype(np.float64):
            py = min(h - 1, int((y0 + y1) / 2 // stride))  # the cell holding the centre (CenterNet's floor)
            px = min(w - 1, int((x0 + x1) / 2 // stride))
            g = torch.exp(-((torch.arange(h, device=device)[:, None] - py) ** 2
                            + (torch.arange(w, device=device)[None, :] - px) ** 2) / (2 * sigma ** 2))
            wins = g > heat[i, 0]
            heat[i, 0] = torch.where(wins, g, heat[i, 0])
            d = torch.stack([(cy - y0)[:, None].expand(h, w), (y1 - cy)[:, None].expand(h, w),
                             (cx - x0)[None, :].expand(h, w), (x1 - cx)[None, :].expand(h, w)]) / stride
            dist[i] = torch.where(wins[None], d, dist[i])
    return LocalisationTargets(heat, dist, heat >= positive_threshold, all_boxes)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss of heatmap logits against Gaussian targets (same
    shape), normalised by the number of centre cells (target == 1; at least 1): near a centre a
    high prediction is penalised less (by (1 - target)^beta), so the peak is learnt as a peak.

    >>> t = torch.tensor([[0.0, 1.0, 0.0]])
    >>> good, bad = focal_loss(torch.tensor([[-4.0, 4.0, -4.0]]), t), focal_loss(torch.tensor([[4.0, -4.0, 4.0]]), t)
    >>> bool(good < 0.01 < bad)
    True
    """
    logits, target = logits.float(), target.float()
    p = torch.sigmoid(logits)
    pos = target >= 1 - 1e-4
    pos_term = (1 - p) ** alpha * F.logsigmoid(logits)
    neg_term = (1 - target) ** beta * p ** alpha * F.logsigmoid(-logits)
    loss = -(torch.where(pos, pos_term, neg_term)).sum()
    return loss / pos.sum().clamp(min=1)


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of a probability map against a (soft) target over the whole batch.

    >>> ones = torch.ones(4)
    >>> float(soft_dice_loss(ones, ones, eps=0.0)), float(soft_dice_loss(torch.zeros(4), ones, eps=0.0))
    (0.0, 1.0)
    """
    p, t = probabilities.float(), target.float()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def diou_loss(predicted: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Distance-IoU loss (1 - IoU + centre distance^2 / enclosing diagonal^2) of boxes given as
    distances (B, 4, h, w) from the same cell to their edges, averaged over ``positive`` cells
    (B, 1, h, w); zero (with a graph) when there are none.

    >>> t = torch.ones(1, 4, 1, 1); pos = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    >>> shifted = torch.tensor([1.0, 1, 0, 2]).view(1, 4, 1, 1)  # IoU 1/3, centres 1 apart, enclosing diagonal^2 13
    >>> float(diou_loss(t, t, pos)), round(float(diou_loss(shifted, t, pos)), 4)
    (0.0, 0.7436)
    """
    mask = positive.expand_as(predicted[:, :1])[:, 0]
    if not bool(mask.any()):
        return predicted.sum() * 0
    p = predicted.float().permute(0, 2, 3, 1)[mask]  # (n, 4): y-, y+, x-, x+
    t = target.float().permute(0, 2, 3, 1)[mask]
    area_p = (p[:, 0] + p[:, 1]) * (p[:, 2] + p[:, 3])
    area_t = (t[:, 0] + t[:, 1]) * (t[:, 2] + t[:, 3])
    inter = (torch.minimum(p[:, 0], t[:, 0]) + torch.minimum(p[:, 1], t[:, 1])).clamp(min=0) * \
            (torch.minimum(p[:, 2], t[:, 2]) + torch.minimum(p[:, 3], t[:, 3])).clamp(min=0)
    iou = inter / (area_p + area_t - inter).clamp(min=1e-6)
    enclosing = (torch.maximum(p[:, 0], t[:, 0]) + torch.maximum(p[:, 1], t[:, 1])) ** 2 + \
                (torch.maximum(p[:, 2], t[:, 2]) + torch.maximum(p[:, 3], t[:, 3])) ** 2
    offset_y = (p[:, 1] - p[:, 0]) / 2 - (t[:, 1] - t[:, 0]) / 2  # centre of each box relative to the cell
    offset_x = (p[:, 3] - p[:, 2]) / 2 - (t[:, 3] - t[:, 2]) / 2
    centre = offset_y ** 2 + offset_x ** 2
    return (1 - iou + centre / enclosing.clamp(min=1e-6)).mean()


class LocalisationLoss(nn.Module):
    """L-Net's loss: focal + ``dice_weight`` x soft Dice on the heatmap (the paper: 0.2) +
    ``box_weight`` x DIoU on the boxes at positive cells, against :func:`localisation_targets`."""

    def __init__(self, sigma: float, dice_weight: float = 0.2, box_weight: float = 1.0):
        super().__init__()
        self.sigma, self.dice_weight, self.box_weight = float(sigma), float(dice_weight), float(box_weight)

    def forward(self, output: LocalisationOutput, foreground: torch.Tensor, stride: int) -> torch.Tensor:
        t = localisation_targets(foreground, stride, self.sigma)
        heat = focal_loss(output.heatmap, t.heatmap)
        if self.dice_weight:
            heat = heat + self.dice_weight * soft_dice_loss(torch.sigmoid(output.heatmap.float()), t.heatmap)
        return heat + self.box_weight * diou_loss(output.distances, t.distances, t.positive)


def keypoints(heatmap: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's inference rule on one heatmap of probabilities (h, w): one keypoint per
    8-connected component of ``heatmap > threshold``, at the component's peak. Returns cells
    (n, 2) int and their probabilities (n,), strongest first.

    >>> h = torch.zeros(6, 6); h[1, 1], h[1, 2], h[4, 4] = 0.6, 0.9, 0.7
    >>> cells, scores = keypoints(h, 0.5)
    >>> cells.tolist(), [round(float(s), 2) for s in scores]
    ([[1, 2], [4, 4]], [0.9, 0.7])
    """
    p = heatmap.detach().float().cpu().numpy()
    labels, n = ndimage.label(p > threshold, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    peaks = np.array(ndimage.maximum_position(p, labels, range(1, n + 1)), dtype=np.int64).reshape(n, 2)
    scores = p[peaks[:, 0], peaks[:, 1]]
    order = np.argsort(-scores, kind="stable")
    return peaks[order], scores[order]


def top_keypoints(heatmap: torch.Tensor, k: int) -> np.ndarray:
    """The ``k`` strongest local maxima (3 x 3 neighbourhood) of one heatmap (h, w): cells (<= k, 2)
    int, strongest first (the training rule: one of the top three is taken at random).

    >>> h = torch.zeros(6, 6); h[1, 1], h[1, 2], h[4, 4] = 0.6, 0.9, 0.7
    >>> top_keypoints(h, 3).tolist()  # (1, 1) is no local maximum: (1, 2) beside it is higher
    [[1, 2], [4, 4]]
    """
    h = heatmap.detach().float()
    peak = (F.max_pool2d(h[None, None], 3, stride=1, padding=1)[0, 0] == h) & (h > h.min())
    if not bool(peak.any()):  # a constant map: its first cell
        return np.zeros((1, 2), np.int64)
    values = torch.where(peak, h, torch.full_like(h, -float("inf"))).flatten()
    top = torch.topk(values, min(k, int(peak.sum()))).indices.cpu().numpy()
    return np.stack(np.unravel_index(top, h.shape), axis=1).astype(np.int64)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward pass.
    ``factor == 0`` detaches: nothing before ``x`` receives a gradient (not even a zero one, so an
    optimiser step with momentum or weight decay leaves those parameters as they are).

    >>> x = torch.ones(2, requires_grad=True); scale_gradient(x, 0.5).sum().backward(); x.grad.tolist()
    [0.5, 0.5]
    """
    if factor == 0:
        return x.detach()
    if factor == 1:
        return x
    return x * factor + x.detach() * (1 - factor)


def boxes_at_keypoints(cells: np.ndarray, distances: torch.Tensor, stride: int, margin: float,
                       input_shape: Sequence[int], image_shape: Sequence[int]) -> torch.Tensor:
    """RoIs (n, 2, 2) on the full-resolution grid of ``image_shape`` for keypoint ``cells`` (n, 2)
    of one image: the regressed box at each cell (``distances`` (4, h, w) in cells) widened by
    ``margin`` pixels of the input grid, clipped to the image, at least one input pixel wide, then
    scaled to the image grid. Differentiable in ``distances`` (the paper's affine parameters
    scale and translation are these boxes: ``crop_and_resample`` builds the same grid).

    >>> d = torch.ones(4, 4, 4)  # every cell: 1 cell (= 2 px) to each edge
    >>> boxes_at_keypoints(np.array([[1, 1]]), d, 2, 0.5, (8, 8), (16, 16)).tolist()  # centre 3 px, +-2 px, +-0.5
    [[[1.0, 11.0], [1.0, 11.0]]]
    """
    if len(cells) == 0:
        return distances.new_zeros((0, 2, 2))
    cells_t = torch.as_tensor(np.asarray(cells), device=distances.device, dtype=torch.long)
    d = distances[:, cells_t[:, 0], cells_t[:, 1]].T.float()  # (n, 4)
    centre = (cells_t.float() + 0.5) * stride  # (n, 2) input pixels
    lo = centre - d[:, [0, 2]] * stride - margin
    hi = centre + d[:, [1, 3]] * stride + margin
    limit = torch.as_tensor([float(s) for s in input_shape], device=distances.device)
    lo = torch.minimum(lo.clamp(min=0), limit - 1)
    hi = torch.maximum(torch.minimum(hi, limit), lo + 1)
    scale = torch.as_tensor([float(i) / float(s) for i, s in zip(image_shape, input_shape)], device=distances.device)
    return torch.stack([lo * scale, hi * scale], dim=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of boxes (N, ndim, 2) and (M, ndim, 2), [start, stop) per axis.

    >>> box_iou(np.array([[[0, 2], [0, 2]]]), np.array([[[1, 3], [0, 2]], [[4, 5], [4, 5]]])).round(3).tolist()
    [[0.333, 0.0]]
    """
    a = np.asarray(a, float)[:, None]
    b = np.asarray(b, float)[None]
    inter = np.prod(np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0, None), axis=-1)
    union = np.prod(a[..., 1] - a[..., 0], axis=-1) + np.prod(b[..., 1] - b[..., 0], axis=-1) - inter
    return inter / np.maximum(union, 1e-9)


def best_box_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """For every ground-truth box (M, ndim, 2) its best IoU with any predicted box (0 with none):
    the first stage's box quality (the paper's mIoU is the mean of these over objects).

    >>> best_box_iou(np.zeros((0, 2, 2)), np.array([[[0, 2], [0, 2]]])).tolist()
    [0.0]
    """
    if len(truth) == 0:
        return np.zeros(0)
    if len(predicted) == 0:
        return np.zeros(len(truth))
    return box_iou(truth, predicted).max(axis=1)


class LocalisationHeads(nn.Module):
    """The keypoint head (3x3 conv, ReLU, 1x1 conv to one logit; bias at -2.19, CenterNet's prior
    of 0.1 so that the focal loss starts stable) and the box head (two 3x3 convs with ReLU, then one
    13x13 conv to four distances, softplus: non-negative) on a feature map (B, F, h, w)."""

    def __init__(self, channels: int, head_channels: int | None = None):
        super().__init__()
        hc = int(head_channels or channels)
        self.keypoint = nn.Sequential(nn.Conv2d(channels, hc, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hc, 1, 1))
        nn.init.constant_(self.keypoint[-1].bias, KEYPOINT_PRIOR_BIAS)
        self.box = nn.Sequential(nn.Conv2d(channels, hc, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hc, hc, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hc, 4, 13, padding=6))

    def forward(self, features: torch.Tensor) -> LocalisationOutput:
        return LocalisationOutput(self.keypoint(features), F.softplus(self.box(features)))


class LocalisationNetwork(nn.Module):
    """L-Net: ``features`` (any module mapping images (B, C, m, m) to a feature map (B, F, m/s, m/s)
    of ``stride`` s) with :class:`LocalisationHeads`.

    >>> net = LocalisationNetwork(nn.Conv2d(1, 8, 4, stride=4), channels=8, stride=4)
    >>> out = net(torch.rand(2, 1, 32, 32)); out.heatmap.shape, out.distances.shape
    (torch.Size([2, 1, 8, 8]), torch.Size([2, 4, 8, 8]))
    """

    def __init__(self, features: nn.Module, channels: int, stride: int, head_channels: int | None = None):
        super().__init__()
        self.features = features
        self.stride = int(stride)
        self.heads = LocalisationHeads(channels, head_channels)

    def forward(self, images: torch.Tensor) -> LocalisationOutput:
        return self.heads(self.features(images))


class LSNet(nn.Module):
    """The whole L-SNet (state dict ``locator.*`` + ``segmenter.*``, one checkpoint).

    ``locator_size``: L-Net's input m (the whole image is downscaled to it by
    :func:`~nnunet_stseg.core.crop_guided.downscale`); ``roi_size``: the S-Net patch every RoI is
    resampled to; ``margin_fraction``: the RoI margin as a fraction of L-Net's longer input side
    (the paper's 15 px at 512 px); ``threshold``: the keypoint rule at inference; ``gamma``: the
    factor on the S-Net loss's gradient into L-Net; ``top_k``: in training each image contributes
    ONE RoI, at one of its ``top_k`` strongest peaks chosen at random (numpy's global generator);
    ``fallback``: an image without keypoint gets no RoI (``empty``), one at its strongest peak
    (``best``) or the whole image (``whole``); ``out_channels``: the S-Net's output channels.

    ``forward`` on same-size images (B, C, H, W) returns a
    :class:`~nnunet_stseg.core.crop_guided.CropGuidedOutput`: ``coarse`` = the heatmap logits,
    ``fine`` = S-Net logits (N, K, *roi_size), ``boxes`` = per image (n_b, 2, 2) float RoIs on the
    image grid, ``localisation`` = L-Net's output.

    >>> loc = LocalisationNetwork(nn.Conv2d(1, 8, 4, stride=4), 8, 4)
    >>> net = LSNet(loc, nn.Conv2d(1, 2, 1), (16, 16), (8, 8), out_channels=2, fallback="whole").eval()
    >>> out = net(torch.rand(1, 1, 64, 64))
    >>> out.fine.shape[1:], out.boxes[0].shape[1:]
    (torch.Size([2, 8, 8]), (2, 2))
    """

    def __init__(self, locator: LocalisationNetwork, segmenter: nn.Module, locator_size: Sequence[int],
                 roi_size: Sequence[int], out_channels: int, margin_fraction: float = PAPER_MARGIN_FRACTION,
                 threshold: float = 0.5, gamma: float = 0.1, top_k: int = 3, fallback: str = "empty",
                 multilabel: bool = False):
        super().__init__()
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        self.locator = locator
        self.segmenter = segmenter
        self.locator_size = tuple(int(s) for s in locator_size)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.out_channels = int(out_channels)
        self.margin_fraction, self.threshold, self.gamma = float(margin_fraction), float(threshold), float(gamma)
        self.top_k, self.fallback, self.multilabel = int(top_k), fallback, bool(multilabel)
        self.last_fallbacks = 0  # images of the last forward that had no keypoint above the threshold

    @property
    def margin(self) -> float:
        """The RoI margin in pixels of L-Net's input grid."""
        return self.margin_fraction * max(self.locator_size)

    def locate(self, images: torch.Tensor) -> LocalisationOutput:
        """L-Net on images (B, C, H, W) downscaled to its input size."""
        return self.locator(downscale(images, self.locator_size))

    def keypoint_cells(self, heatmap: torch.Tensor) -> list[np.ndarray]:
        """Keypoint cells per image of a heatmap batch (B, 1, h, w) of logits: at inference the
        paper's rule (:func:`keypoints`, with the fallback); in training one of the ``top_k`` peaks."""
        probs = torch.sigmoid(heatmap.float())[:, 0]
        cells, self.last_fallbacks = [], 0
        for p in probs:
            if self.training:
                top = top_keypoints(p, self.top_k)
                cells.append(top[np.random.randint(len(top))][None])
                continue
            found, _ = keypoints(p, self.threshold)
            if len(found) == 0:
                self.last_fallbacks += 1
                found = top_keypoints(p, 1) if self.fallback == "best" else found
            cells.append(found)
        return cells

    def rois(self, loc: LocalisationOutput, image_shape: Sequence[int]) -> list[torch.Tensor]:
        """RoIs per image (n_b, 2, 2) on the image grid, differentiable in L-Net's distances with the
        gradient scaled by ``gamma`` (see :func:`scale_gradient`)."""
        distances = scale_gradient(loc.distances, self.gamma)
        out = []
        for b, cells in enumerate(self.keypoint_cells(loc.heatmap)):
            if len(cells) == 0 and self.fallback == "whole" and not self.training:
                out.append(torch.tensor([[[0.0, float(image_shape[0])], [0.0, float(image_shape[1])]]],
                                        device=distances.device))
                continue
            out.append(boxes_at_keypoints(cells, distances[b], self.locator.stride, self.margin, self.locator_size,
                                          image_shape))
        return out

    def forward(self, images: torch.Tensor) -> CropGuidedOutput:
        loc = self.locate(images)
        spatial = tuple(images.shape[2:])
        rois = self.rois(loc, spatial)
        crops = [crop_and_resample(images[b], r, self.roi_size, "linear", padding_mode="zeros")
                 for b, r in enumerate(rois) if len(r)]
        if crops:
            fine = self.segmenter(torch.cat(crops).to(images.dtype))
        else:
            fine = images.new_zeros((0, self.out_channels, *self.roi_size))
        boxes = [r.detach().cpu().numpy().astype(np.float64) for r in rois]
        return CropGuidedOutput(loc.heatmap, fine, boxes, loc)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters of a module (the 'parameters each first stage adds' figure).

    >>> parameter_count(nn.Conv2d(3, 8, kernel_size=3))  # 8 x 3 x 3 x 3 weights + 8 biases
    224
    """
    return int(sum(p.numel() for p in module.parameters()))


__all__ = ["FALLBACKS", "KEYPOINT_PRIOR_BIAS", "PAPER_MARGIN_FRACTION", "LSNet", "LocalisationHeads",
           "LocalisationLoss",
           "LocalisationNetwork", "LocalisationOutput", "LocalisationTargets", "best_box_iou", "box_iou",
           "boxes_at_keypoints", "diou_loss", "focal_loss", "keypoints", "localisation_targets", "object_boxes",
           "parameter_count", "scale_gradient", "soft_dice_loss", "top_keypoints"]
