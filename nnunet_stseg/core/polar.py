"""Polar-transform geometry: origins, polar resampling, inverse mapping, multi-object fusion.

Pure functions with no nnU-Net imports, on torch tensors (any device) or numpy arrays.

Conventions (used by training, inference and tests alike):

- Images are (C, H, W); pixel ``(y, x)`` has its centre at integer coordinates, the image covers
  ``[-0.5, H - 0.5] x [-0.5, W - 0.5]``. An origin is ``(y, x)`` in those coordinates
  (fractional allowed); a 3D volume (C, Z, H, W) is handled slice by slice with origins
  ``(z, y, x)``, ``z`` an integer slice index.
- A polar image is (C, A, R): row ``i`` is the angle ``theta_i = theta0 + 2 pi i / A`` (angle
  measured from the +x axis towards +y), column ``j`` the radius ``r_j = j * radius / (R - 1)``,
  linear in radius, so column 0 is the origin itself and the last column reaches ``radius``.
- ``radius`` = distance from the origin to the farthest image CORNER (not half the diagonal as
  the reference code had): no pixel of the image is ever outside the polar image, wherever the
  origin lies.
- Rotation about the origin is a cyclic shift along the angle axis (``theta0``); a Cartesian
  mirror across a line through the origin is a flip of the angle axis. A flip of the radius axis
  has no Cartesian meaning (it would move the origin to the border).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

_MODES = {"linear": "bilinear", "nearest": "nearest"}


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    was_numpy = not isinstance(x, torch.Tensor)
    return torch.as_tensor(np.ascontiguousarray(x) if was_numpy else x), was_numpy


def farthest_corner_distance(origins, image_shape: Sequence[int]) -> np.ndarray:
    """Distance (pixels) from each origin (N, 2) ``(y, x)`` to the farthest corner of an image of
    ``image_shape`` (H, W): the polar radius that keeps every pixel inside the polar image.

    >>> farthest_corner_distance(np.array([[0.0, 0.0], [1.5, 1.5]]), (4, 4)).round(3).tolist()
    [4.95, 2.828]
    """
    o = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
    h, w = float(image_shape[0]), float(image_shape[1])
    corners = np.array([[-0.5, -0.5], [-0.5, w - 0.5], [h - 0.5, -0.5], [h - 0.5, w - 0.5]])
    d = np.sqrt(((o[:, None, :] - corners[None]) ** 2).sum(-1))
    return d.max(axis=1)


def _polar_sampling_grid(origins: torch.Tensor, radius: torch.Tensor, theta0: torch.Tensor,
                         polar_shape: tuple[int, int], image_shape: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (N, A, R, 2) of the Cartesian points of every polar sample."""
    a, r = polar_shape
    h, w = image_shape
    dev = origins.device
    theta = theta0[:, None] + torch.arange(a, device=dev, dtype=torch.float32)[None] * (2 * math.pi / a)  # (N, A)
    rad = radius[:, None] * torch.arange(r, device=dev, dtype=torch.float32)[None] / max(r - 1, 1)  # (N, R)
    y = origins[:, 0, None, None] + rad[:, None, :] * torch.sin(theta)[:, :, None]
    x = origins[:, 1, None, None] + rad[:, None, :] * torch.cos(theta)[:, :, None]
    gx = (2 * x + 1) / w - 1
    gy = (2 * y + 1) / h - 1
    return torch.stack([gx, gy], dim=-1)


def _broadcast(values, n: int, default: float, dev) -> torch.Tensor:
    """(n,) float32 on ``dev`` (every grid is float32: devices such as mps have no float64)."""
    if values is None:
        return torch.full((n,), float(default), dtype=torch.float32, device=dev)
    host = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    t = torch.as_tensor(host.astype(np.float32), device=dev).reshape(-1)
    return t.expand(n).clone() if t.numel() == 1 else t


def to_polar(image, origins, polar_shape: Sequence[int], mode: str = "linear", radius=None, theta0=None,
             padding_mode: str = "border"):
    """Polar images of ``image`` around each origin, in ONE grid_sample call.

    ``image``: (C, H, W) with origins (N, 2) ``(y, x)``, or (C, Z, H, W) with origins (N, 3)
    ``(z, y, x)`` (each origin reads its own slice). ``radius`` (N,) defaults to the farthest
    corner distance; ``theta0`` (N,) is the angle of row 0 (rotation augmentation), default 0.
    Polar samples beyond the image edge repeat the edge pixel (``padding_mode='border'``) so that
    pixels on the image border map back undiluted (with zeros they would read a mix of image and
    padding, and objects touching the border would lose their edge pixels).
    Returns (N, C, A, R) float32 on the image's device (numpy in -> numpy out) and the radii used
    (numpy, N).

    >>> image = torch.ones((1, 9, 9))  # (C, H, W)
    >>> polar, radius = to_polar(image, np.array([[4.0, 4.0]]), (16, 8))
    >>> polar.shape, radius.round(3).tolist()  # (N, C, angles, radii), per origin
    (torch.Size([1, 1, 16, 8]), [6.364])
    """
    img, was_numpy = _as_tensor(image)
    img = img.float()
    a, r = (int(v) for v in polar_shape)
    if a < 2 or r < 2:
        raise ValueError(f"polar_shape needs >= 2 angles and >= 2 radii, got {tuple(polar_shape)}")
    o = np.asarray(origins, dtype=np.float64).reshape(len(origins) if len(origins) else 0, -1)
    if img.ndim == 4:
        if o.shape[1] != 3:
            raise ValueError(f"a (C, Z, H, W) volume needs origins (N, 3) as (z, y, x), got shape {o.shape}")
        z = o[:, 0].astype(np.int64)
        if len(z) and (z.min() < 0 or z.max() >= img.shape[1]):
            raise ValueError(f"origin slice indices {sorted(set(z.tolist()))} outside 0..{img.shape[1] - 1}")
        planes = img[:, torch.as_tensor(z, device=img.device)].transpose(0, 1)  # (N, C, H, W)
        o = o[:, 1:]
    elif img.ndim == 3:
        if o.shape[1] != 2:
            raise ValueError(f"a (C, H, W) image needs origins (N, 2) as (y, x), got shape {o.shape}")
        planes = img[None].expand(len(o), *img.shape)
    else:
        raise ValueError(f"image must be (C, H, W) or (C, Z, H, W), got shape {tuple(img.shape)}")
    hw = tuple(int(s) for s in planes.shape[-2:])
    n = len(o)
    if radius is None:
        radius = farthest_corner_distance(o, hw)
    dev = img.device
    rad = _broadcast(radius, n, 0.0, dev)
    th = _broadcast(theta0, n, 0.0, dev)
    if n == 0:
        out = img.new_zeros((0, img.shape[0], a, r))
    else:
        grid = _polar_sampling_grid(torch.as_tensor(o.astype(np.float32), device=dev), rad, th, (a, r), hw)
        out = F.grid_sample(planes, grid, mode=_MODES[mode], padding_mode=padding_mode, align_corners=False)
    radii = rad.cpu().numpy().astype(np.float64)
    return (out.cpu().numpy() if was_numpy else out), radii


def from_polar(polar, origins, image_shape: Sequence[int], radius, theta0=None, mode: str = "linear"):
    """Inverse of :func:`to_polar`: (N, K, A, R) polar maps back onto (N, K, H, W) Cartesian maps
    around their origins (N, 2) ``(y, x)`` (for a volume pass the in-plane part of the origins).
    The angle axis is periodic: it is padded cyclically so that interpolation across
    ``2 pi -> 0`` is continuous. ``radius``/``theta0`` must be those used by :func:`to_polar`.

    >>> mask = torch.zeros((1, 9, 9)); mask[0, 2:7, 2:7] = 1
    >>> polar, radius = to_polar(mask, np.array([[4.0, 4.0]]), (64, 32), "nearest")
    >>> back = from_polar(polar, np.array([[4.0, 4.0]]), (9, 9), radius, mode="nearest")
    >>> back.shape, bool(back[0, 0].eq(mask[0]).all())
    (torch.Size([1, 1, 9, 9]), True)
    """
    p, was_numpy = _as_tensor(polar)
    p = p.float()
    n, k, a, r = p.shape
    o = torch.as_tensor(np.asarray(origins, dtype=np.float32).reshape(n, -1)[:, -2:], device=p.device)
    h, w = (int(s) for s in image_shape)
    rad = _broadcast(radius, n, 0.0, p.device)
    th = _broadcast(theta0, n, 0.0, p.device)
    if n == 0:
        out = p.new_zeros((0, k, h, w))
        return out.cpu().numpy() if was_numpy else out
    yy = torch.arange(h, device=p.device, dtype=torch.float32)[None, :, None] - o[:, 0, None, None]
    xx = torch.arange(w, device=p.device, dtype=torch.float32)[None, None, :] - o[:, 1, None, None]
    dist = torch.sqrt(yy ** 2 + xx ** 2)  # (N, H, W)
    ang = torch.remainder(torch.atan2(yy.expand(n, h, w), xx.expand(n, h, w)) - th[:, None, None], 2 * math.pi)
    row = ang / (2 * math.pi) * a + 1.0  # +1: one cyclic row padded above
    col = dist / torch.clamp(rad, min=1e-12)[:, None, None] * (r - 1)
    padded = torch.cat([p[:, :, -1:], p, p[:, :, :1]], dim=2)  # (N, K, A + 2, R)
    gy = 2 * row / (a + 1) - 1
    gx = 2 * col / (r - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)
    out = F.grid_sample(padded, grid, mode=_MODES[mode], padding_mode="border", align_corners=True)
    return out.cpu().numpy() if was_numpy else out


# ----------------------------------------------------------------------------------------------
# origins
# ----------------------------------------------------------------------------------------------

def angle_seam_padding(n_angles: int, fraction: float, stride: int = 1) -> int:
    """Rows of wrap-around context added on each side of the angle axis at inference: about
    ``fraction`` x ``n_angles``, rounded up to a multiple of the network's total stride along that
    axis (so the padded image is still a valid input size); 0 when ``fraction`` is 0.

    >>> angle_seam_padding(128, 0.125, stride=32), angle_seam_padding(128, 0.0)
    (32, 0)
    """
    if fraction <= 0:
        return 0
    stride = max(1, int(stride))
    return int(math.ceil(fraction * n_angles / stride) * stride)


def wrap_angles(polar, pad: int):
    """(..., A, R) -> (..., A + 2 pad, R): the last ``pad`` angles before the first and the first
    ``pad`` after the last. The angle axis is periodic; a network that sees only [0, 2 pi) has no
    context across the seam at angle 0 and predicts a radial step there.

    >>> polar = torch.arange(4.0).reshape(1, 1, 4, 1)  # (N, C, A, R)
    >>> wrap_angles(polar, 1)[0, 0, :, 0].tolist()
    [3.0, 0.0, 1.0, 2.0, 3.0, 0.0]
    """
    if pad == 0:
        return polar
    if pad > polar.shape[-2]:
        raise ValueError(f"seam padding {pad} exceeds the {polar.shape[-2]} angles")
    if isinstance(polar, torch.Tensor):
        return torch.cat([polar[..., -pad:, :], polar, polar[..., :pad, :]], dim=-2)
    return np.concatenate([polar[..., -pad:, :], polar, polar[..., :pad, :]], axis=-2)


def unwrap_angles(padded, pad: int):
    """Inverse of :func:`wrap_angles`: drop the ``pad`` context rows on each side.

    >>> padded = torch.tensor([3.0, 0.0, 1.0, 2.0, 3.0, 0.0]).reshape(1, 1, 6, 1)
    >>> unwrap_angles(padded, 1)[0, 0, :, 0].tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    return padded if pad == 0 else padded[..., pad:padded.shape[-2] - pad, :]


def component_centroids(mask, min_size: float | Sequence[float] = 0.0, max_per_slice: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Centres of mass of the connected components of a binary mask (H, W), or of each slice of a
    (Z, H, W) mask (components never connect across slices), 8-connectivity in-plane.

    Components whose bounding box is narrower than ``min_size`` pixels along y or x are skipped
    (the cascade's 5-pixel rule; one value, or one per axis (y, x)); with ``max_per_slice`` only the largest components of a slice
    are kept. Returns ``(centroids, areas)``: (N, 2) ``(y, x)`` or (N, 3) ``(z, y, x)`` float64 and
    (N,) pixel counts, slice by slice.

    >>> mask = np.zeros((6, 6), bool); mask[1:3, 1:3] = True; mask[4, 4] = True
    >>> [a.tolist() for a in component_centroids(mask)]  # centroids (N, 2) and areas (N,)
    [[[1.5, 1.5], [4.0, 4.0]], [4, 1]]
    >>> component_centroids(mask, min_size=2)[0].tolist()  # the 1-px component gives no origin
    [[1.5, 1.5]]
    >>> len(component_centroids(mask, min_size=(0, 3))[0])  # 3 px along x: neither
    0
    """
    cents, areas, _ = component_origins(mask, None, min_size, max_per_slice)
    return cents, areas


def component_origins(mask, values=None, min_size: float | Sequence[float] = 0.0, max_per_slice: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`component_centroids` plus the mean of ``values`` (same shape as ``mask``, e.g. the
    coarse model's foreground probability) over each kept component: the confidence of the
    origin at its centroid (NaN without ``values``). Returns ``(centroids, areas, means)``.

    >>> mask = np.zeros((6, 6), bool); mask[1:3, 1:3] = True; mask[4, 4] = True
    >>> prob = np.where(mask, 0.9, 0.1); prob[4, 4] = 0.6
    >>> component_origins(mask, prob)[2].round(2).tolist()  # one confidence per component
    [0.9, 0.6]
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    v = None if values is None else np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if v is not None and v.shape != m.shape:
        raise ValueError(f"values {v.shape} must have the mask's shape {m.shape}")
    if m.ndim == 3:
        parts = [component_origins(m[z], None if v is None else v[z], min_size, max_per_slice)
                 for z in range(m.shape[0])]
        cents = [np.concatenate([np.full((len(c), 1), z, dtype=np.float64), c], axis=1)
                 for z, (c, _, _) in enumerate(parts)]
        return (np.concatenate(cents), np.concatenate([a for _, a, _ in parts]),
                np.concatenate([c for _, _, c in parts]))
    if m.ndim != 2:
        raise ValueError(f"mask must be 2D or 3D, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0)
    index = np.arange(1, n + 1)
    cents = np.array(ndimage.center_of_mass(m, labels, index), dtype=np.float64).reshape(n, 2)
    areas = np.asarray(ndimage.sum_labels(m, labels, index), dtype=np.int64)
    means = (np.asarray(ndimage.mean(v, labels, index), dtype=np.float64).reshape(n) if v is not None
             else np.full(n, np.nan))
    extents = np.array([[sl.stop - sl.start for sl in obj] for obj in ndimage.find_objects(labels)])
    keep = np.all(extents >= np.asarray(min_size, dtype=float) - 1e-6, axis=1)
    cents, areas, means = cents[keep], areas[keep], means[keep]
    if max_per_slice is not None and len(areas) > max_per_slice:
        largest = np.sort(np.argsort(-areas, kind="stable")[:max_per_slice])
        cents, areas, means = cents[largest], areas[largest], means[largest]
    return cents, areas, means


def shift_origin(origin: np.ndarray, image_shape: Sequence[int], rng: np.random.Generator,
                 probability: float = 0.3, fraction: float = 0.05) -> np.ndarray:
    """Training-time centre augmentation: with ``probability``, shift y and x each by a uniform
    value in ``+-fraction * min(H, W)``; the result stays inside the image. Drawn anew for every
    sample (the reference code froze it once per dataset in one branch).

    >>> o = shift_origin(np.array([5.0, 5.0]), (10, 10), np.random.default_rng(0), probability=1.0, fraction=0.1)
    >>> bool(np.all(np.abs(o - 5) <= 1))  # moved by at most 0.1 x min(H, W)
    True
    """
    o = np.asarray(origin, dtype=np.float64).copy()
    h, w = image_shape[-2:]
    if rng.random() < probability:
        amp = fraction * min(h, w)
        o[-2:] += rng.uniform(-amp, amp, size=2)
    o[-2] = np.clip(o[-2], 0, h - 1)
    o[-1] = np.clip(o[-1], 0, w - 1)
    return o


def round_trip_dice(mask, origin, polar_shape: Sequence[int]) -> float:
    """Dice of a binary mask (H, W) against itself after Cartesian -> polar -> Cartesian
    (nearest neighbour both ways) around ``origin``: how much a polar resolution loses.

    >>> mask = np.zeros((32, 32)); mask[8:24, 10:20] = 1
    >>> round(round_trip_dice(mask, (16.0, 15.0), (64, 64)), 3)
    1.0
    """
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None]
    o = np.asarray(origin, dtype=np.float64).reshape(1, 2)
    polar, radius = to_polar(m, o, polar_shape, mode="nearest")
    back = from_polar(polar, o, m.shape[-2:], radius, mode="nearest")[0, 0] > 0.5
    ref = m[0] > 0.5
    denom = int(ref.sum()) + int(back.sum())
    return 1.0 if denom == 0 else 2.0 * int((ref & back).sum()) / denom


__all__ = ["farthest_corner_distance", "to_polar", "from_polar", "angle_seam_padding", "wrap_angles",
           "unwrap_angles", "component_centroids", "component_origins", "shift_origin", "round_trip_dice"]
