"""Centre-point heatmaps for the polar stage's origin source B (methods.md section 3).

Pure functions with no nnU-Net imports. A heatmap target is the pixel-wise MAXIMUM of one 2D
Gaussian (peak 1, standard deviation ``sigma`` pixels) per object, centred at the object's centre
of mass (so two nearby objects keep two peaks instead of merging into one sum). Objects are the
8-connected components of each 2D slice's foreground. Peaks of a predicted heatmap are its local
maxima above a threshold, at least ``min_distance`` pixels apart (scikit-image's
``peak_local_max``, a non-maximum suppression); each peak becomes one polar origin, its height
the origin's confidence.

Two ways to train the model (``sts.centre.loss``): ``focal`` (default since 0.7), CenterNet's
penalty-reduced focal loss on logits against Gaussians whose peak of exactly 1 sits on the pixel
holding the centre (:func:`heatmap_targets` with ``on_pixel``), so the sigmoid of the output is
the probability of "a centre here"; ``mse``, the relative squared error of the output itself
(plans made before 0.7; at our CPU budget its peaks stayed below 0.5 on Kvasir, docs/design.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from nnunet_stseg.core.polar import component_centroids

SIGMA_PER_RADIUS = 0.2  # default sigma = 0.2 x median equivalent object radius (8 px for ~40 px polyps at 256 px)


def default_sigma(median_object_radius: float, minimum: float = 1.0) -> float:
    """The heatmap's standard deviation (pixels of the grid it is predicted on) from the median
    equivalent radius of the dataset's objects on that grid: narrow enough that nearby objects
    keep separate peaks, wide enough to be learnt (the paper's fixed 8 px at 256 px suits ~40 px
    polyps; objects much smaller or larger need their own).

    >>> default_sigma(20.0), default_sigma(2.0)  # 0.2 x the median radius, at least 1 px
    (4.0, 1.0)
    """
    return float(max(minimum, SIGMA_PER_RADIUS * float(median_object_radius)))


def equivalent_radii(mask) -> np.ndarray:
    """Equivalent radius sqrt(area / pi) of every 8-connected component of a 2D mask, or of each
    slice of a 3D (Z, H, W) mask, in pixels.

    >>> mask = np.zeros((1, 20, 20), bool); mask[0, 2:12, 2:12] = True
    >>> equivalent_radii(mask).round(3).tolist()  # sqrt(area / pi) per object
    [5.642]
    """
    _, areas = component_centroids(mask)
    return np.sqrt(np.asarray(areas, dtype=np.float64) / np.pi)


CENTRE_LOSSES = ("focal", "mse")


def gaussian_heatmap(centres, shape: Sequence[int], sigma: float, device=None) -> torch.Tensor:
    """(H, W) float32 map: max over centres (N, 2) ``(y, x)`` of exp(-d^2 / (2 sigma^2)).

    >>> heat = gaussian_heatmap(np.array([[2.0, 3.0]]), (5, 7), sigma=1.0)
    >>> heat.shape, float(heat[2, 3]), round(float(heat[2, 4]), 3)
    (torch.Size([5, 7]), 1.0, 0.607)
    """
    h, w = (int(s) for s in shape)
    out = torch.zeros((h, w), dtype=torch.float32, device=device)
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(c) == 0:
        return out
    yy = torch.arange(h, dtype=torch.float32, device=device)[:, None]
    xx = torch.arange(w, dtype=torch.float32, device=device)[None, :]
    for cy, cx in c:
        out = torch.maximum(out, torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)))
    return out


def heatmap_targets(foreground: torch.Tensor, sigma: float, on_pixel: bool = False) -> torch.Tensor:
    """Heatmap targets (B, 1, H, W) for a batch of 2D foreground masks (B, 1, H, W) or (B, H, W)
    (e.g. nnU-Net's augmented training targets), on the masks' device. ``on_pixel``: each
    Gaussian is centred on the pixel holding the object's centre of mass (rounded), so its peak is
    exactly 1 there: the positive of the focal loss.

    >>> fg = torch.zeros((1, 9, 9), dtype=torch.bool); fg[0, 3:5, 3:6] = True  # (B, H, W), centre (3.5, 4)
    >>> t, snapped = heatmap_targets(fg, sigma=1.0), heatmap_targets(fg, sigma=1.0, on_pixel=True)
    >>> t.shape, float(t.max()) < 1, float(snapped[0, 0, 4, 4])  # (B, 1, H, W); peak 1 on the pixel
    (torch.Size([1, 1, 9, 9]), True, 1.0)
    """
    fg = foreground[:, 0] if foreground.ndim == 4 else foreground
    maps = []
    for m in fg:
        centres = component_centroids(m.detach().cpu().numpy() > 0)[0]
        maps.append(gaussian_heatmap(np.floor(centres + 0.5) if on_pixel else centres, m.shape, sigma, fg.device))
    return torch.stack(maps)[:, None]


def centre_probability(output: torch.Tensor, loss: str) -> torch.Tensor:
    """The centre model's heatmap from its raw output: the sigmoid of the logits of a focal-loss
    model (a probability of "a centre here"), the output itself for the squared-error model.

    >>> [round(v, 3) for v in centre_probability(torch.tensor([0.0, 2.0]), "focal").tolist()]
    [0.5, 0.881]
    """
    if loss not in CENTRE_LOSSES:
        raise ValueError(f"centre loss must be one of {CENTRE_LOSSES}, got {loss!r}")
    return torch.sigmoid(output.float()) if loss == "focal" else output.float()


def heatmap_peaks(heatmap, min_distance: int, threshold: float | None = 0.5,
                  max_peaks: int | None = None, with_heights: bool = False):
    """Peaks (N, 2) ``(y, x)`` float64 of a 2D heatmap, strongest first: local maxima
    ``>= threshold`` at least ``min_distance`` pixels apart (non-maximum suppression: of two
    maxima closer than that only the higher stays). ``threshold=None``: every local maximum
    (with ``max_peaks=1`` the argmax; nothing only for a constant map). ``with_heights``: also
    the heatmap's value at each peak (N,), the origin's confidence.

    >>> heat = np.zeros((9, 9)); heat[2, 2] = 0.9; heat[6, 6] = 0.3; heat[2, 3] = 0.8
    >>> heatmap_peaks(heat, min_distance=2).tolist(), heatmap_peaks(heat, 2, threshold=None).tolist()
    ([[2.0, 2.0]], [[2.0, 2.0], [6.0, 6.0]])
    >>> heatmap_peaks(heat, 2, threshold=0.2, with_heights=True)[1].round(2).tolist()
    [0.9, 0.3]
    """
    from skimage.feature import peak_local_max

    h = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2D, got shape {h.shape}")
    peaks = peak_local_max(h, min_distance=max(1, int(min_distance)), threshold_abs=threshold, exclude_border=False,
                           num_peaks=max_peaks if max_peaks is not None else np.inf).reshape(-1, 2)
    if with_heights:
        return peaks.astype(np.float64), h[peaks[:, 0], peaks[:, 1]].astype(np.float64)
    return peaks.astype(np.float64)


def _peak_components(peaks, mask) -> tuple[np.ndarray, np.ndarray, int]:
    """The 8-connected component label (0: none) under each peak (N, 2) of a 2D mask, the label
    image and the number of components."""
    m = np.asarray(mask).astype(bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    p = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    at = np.clip(np.floor(p + 0.5).astype(np.int64), 0, np.asarray(m.shape) - 1)
    return labels[at[:, 0], at[:, 1]], labels, n


def peak_hits(peaks, mask) -> np.ndarray:
    """For each peak (N, 2) of one slice, strongest first, whether it detects an object of ``mask``
    (H, W): the first peak inside a ground-truth component (the polar origin then lies in the
    object, so every ray crosses its boundary once for a star-shaped object) detects it; a peak
    outside every object, or a second peak in a detected one, does not.

    >>> mask = np.zeros((9, 9), bool); mask[1:4, 1:4] = True
    >>> peak_hits(np.array([[2, 2], [3, 3], [7, 7]]), mask).tolist()  # the second peak in one object is no hit
    [True, False, False]
    """
    comps, _, _ = _peak_components(peaks, mask)
    first = np.zeros(len(comps), bool)
    first[np.unique(comps, return_index=True)[1]] = True
    return (comps > 0) & first


def match_peaks_to_objects(peaks, mask) -> dict:
    """Score centre detection for one 2D slice by the rule of :func:`peak_hits`: true positives
    (objects detected), false positives (every other peak), false negatives (objects without a
    peak), and the distances (pixels) of the detecting peaks to their object's centroid.

    >>> mask = np.zeros((9, 9), bool); mask[1:4, 1:4] = True; mask[6:8, 6:8] = True
    >>> m = match_peaks_to_objects(np.array([[2, 2], [0, 8]]), mask)
    >>> m["tp"], m["fp"], m["fn"], m["distances"]
    (1, 1, 1, [0.0])
    """
    p = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    comps, labels, n = _peak_components(p, mask)
    hits = peak_hits(p, mask)
    centroids = (np.array(ndimage.center_of_mass(labels > 0, labels, range(1, n + 1))).reshape(n, 2) if n
                 else np.zeros((0, 2)))
    distances = [float(np.hypot(*(p[i] - centroids[comps[i] - 1]))) for i in np.flatnonzero(hits)]
    tp = int(hits.sum())
    return {"tp": tp, "fp": len(p) - tp, "fn": n - tp, "distances": distances}


CALIBRATION_BINS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def calibration_table(heights, hits, bins: Sequence[float] = CALIBRATION_BINS) -> list[dict]:
    """How often a peak of a given height is a true centre: peaks binned by height (``[lo, hi)``,
    the last bin closed), with the count and the fraction that detect an object. For a calibrated
    model the fraction is close to the bin's heights.

    >>> calibration_table([0.2, 0.8, 0.95, 0.6], [False, True, True, False], bins=(0.1, 0.5, 1.0))
    [{'low': 0.1, 'high': 0.5, 'peaks': 1, 'hit_fraction': 0.0}, {'low': 0.5, 'high': 1.0, 'peaks': 3, 'hit_fraction': 0.667}]
    """
    h, t = np.asarray(heights, dtype=float), np.asarray(hits, dtype=bool)
    rows = []
    for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
        inside = (h >= lo) & ((h <= hi) if i == len(bins) - 2 else (h < hi))
        n = int(inside.sum())
        rows.append({"low": float(lo), "high": float(hi), "peaks": n,
                     "hit_fraction": round(float(t[inside].mean()), 3) if n else None})
    return rows


def detection_by_threshold(table: list[dict], n_objects: int) -> list[dict]:
    """Precision, recall and F1 of the peaks at each lower edge ``t`` of a :func:`calibration_table`
    (peaks >= t count), against ``n_objects`` ground-truth objects: what a peak threshold at t
    would give.

    >>> table = [{"low": 0.1, "high": 0.5, "peaks": 4, "hit_fraction": 0.25},
    ...          {"low": 0.5, "high": 1.0, "peaks": 2, "hit_fraction": 1.0}]
    >>> [(r["threshold"], r["precision"], r["recall"]) for r in detection_by_threshold(table, 4)]
    [(0.1, 0.5, 0.75), (0.5, 1.0, 0.5)]
    """
    rows = []
    for i, row in enumerate(table):
        above = table[i:]
        peaks = sum(r["peaks"] for r in above)
        hits = sum(int(round(r["peaks"] * (r["hit_fraction"] or 0.0))) for r in above)
        precision = hits / peaks if peaks else float("nan")
        recall = hits / n_objects if n_objects else float("nan")
        f1 = 2 * hits / (peaks + n_objects) if peaks + n_objects else float("nan")
        rows.append({"threshold": row["low"], "precision": precision, "recall": recall, "f1": f1})
    return rows


__all__ = ["detection_by_threshold", "default_sigma", "equivalent_radii", "gaussian_heatmap", "heatmap_targets",
           "heatmap_peaks", "centre_probability", "match_peaks_to_objects", "peak_hits", "calibration_table", "SIGMA_PER_RADIUS",
           "CENTRE_LOSSES", "CALIBRATION_BINS"]
