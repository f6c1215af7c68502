"""Centre-point heatmaps for the polar stage's origin source B (methods.md section 3).

Pure functions with no nnU-Net imports. A heatmap target is the pixel-wise MAXIMUM of one 2D
Gaussian (peak 1, standard deviation ``sigma`` pixels) per object, centred at the object's centre
of mass (so two nearby objects keep two peaks instead of merging into one sum). Objects are the
8-connected components of each 2D slice's foreground. Peaks of a predicted heatmap are its local
maxima above a threshold, at least ``min_distance`` pixels apart (scikit-image's
``peak_local_max``); each peak becomes one polar origin.
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


def heatmap_targets(foreground: torch.Tensor, sigma: float) -> torch.Tensor:
    """Heatmap targets (B, 1, H, W) for a batch of 2D foreground masks (B, 1, H, W) or (B, H, W)
    (e.g. nnU-Net's augmented training targets), on the masks' device.

    >>> fg = torch.zeros((1, 9, 9), dtype=torch.bool); fg[0, 3:6, 3:6] = True  # (B, H, W)
    >>> t = heatmap_targets(fg, sigma=1.0)
    >>> t.shape, float(t[0, 0, 4, 4])  # (B, 1, H, W), peak 1 at the object's centre
    (torch.Size([1, 1, 9, 9]), 1.0)
    """
    fg = foreground[:, 0] if foreground.ndim == 4 else foreground
    maps = [gaussian_heatmap(component_centroids(m.detach().cpu().numpy() > 0)[0], m.shape, sigma, fg.device)
            for m in fg]
    return torch.stack(maps)[:, None]


def heatmap_peaks(heatmap, min_distance: int, threshold: float | None = 0.5,
                  max_peaks: int | None = None) -> np.ndarray:
    """Peaks (N, 2) ``(y, x)`` float64 of a 2D heatmap, strongest first: local maxima
    ``>= threshold`` at least ``min_distance`` pixels apart. ``threshold=None``: every local
    maximum (with ``max_peaks=1`` the argmax; nothing only for a constant map).

    >>> heat = np.zeros((9, 9)); heat[2, 2] = 0.9; heat[6, 6] = 0.3
    >>> heatmap_peaks(heat, min_distance=2).tolist(), heatmap_peaks(heat, 2, threshold=None).tolist()
    ([[2.0, 2.0]], [[2.0, 2.0], [6.0, 6.0]])
    """
    from skimage.feature import peak_local_max

    h = np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2D, got shape {h.shape}")
    peaks = peak_local_max(h, min_distance=max(1, int(min_distance)), threshold_abs=threshold, exclude_border=False,
                           num_peaks=max_peaks if max_peaks is not None else np.inf)
    return peaks.astype(np.float64).reshape(-1, 2)


def match_peaks_to_objects(peaks, mask) -> dict:
    """Score centre detection for one 2D slice: a peak inside a ground-truth component detects it
    (the polar origin then lies in the object); the first such peak per component is a true
    positive, every other peak a false positive, components without a peak false negatives.
    Returns counts and the distances (pixels) of true-positive peaks to their component's centroid.

    >>> mask = np.zeros((9, 9), bool); mask[1:4, 1:4] = True; mask[6:8, 6:8] = True
    >>> m = match_peaks_to_objects(np.array([[2, 2], [0, 8]]), mask)
    >>> m["tp"], m["fp"], m["fn"]
    (1, 1, 1)
    """
    m = np.asarray(mask).astype(bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    centroids = np.array(ndimage.center_of_mass(m, labels, range(1, n + 1))).reshape(n, 2) if n else np.zeros((0, 2))
    hit, distances, fp = set(), [], 0
    for y, x in np.asarray(peaks, dtype=np.float64).reshape(-1, 2):
        yi, xi = int(np.clip(round(y), 0, m.shape[0] - 1)), int(np.clip(round(x), 0, m.shape[1] - 1))
        comp = labels[yi, xi]
        if comp == 0 or comp in hit:
            fp += 1
            continue
        hit.add(comp)
        distances.append(float(np.hypot(*(np.array([y, x]) - centroids[comp - 1]))))
    return {"tp": len(hit), "fp": fp, "fn": n - len(hit), "distances": distances}


__all__ = ["default_sigma", "equivalent_radii", "gaussian_heatmap", "heatmap_targets", "heatmap_peaks",
           "match_peaks_to_objects", "SIGMA_PER_RADIUS"]
