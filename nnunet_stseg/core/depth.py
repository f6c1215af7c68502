"""Depth channel for 2D networks on 3D scans (methods.md section 4): pure functions, no nnU-Net.

A 2D network sees one slice and does not know where in the body it lies. The depth channel is one
extra input channel whose every pixel is the slice's normalised position in the WHOLE original
scan: 0 at one end, 1 at the other, ``index / (n_slices - 1)`` counted from the end defined below.

"Slice" follows nnU-Net's preprocessing: nnU-Net transposes each case so that its slice axis
comes first (``transpose_forward``; the axis with the coarsest spacing), crops it to the non-zero
region (``bbox_used_for_cropping``, recorded with ``shape_before_cropping`` in the case's
properties) and, for the 2d configuration, resamples only in-plane.

Depth is measured in PATIENT coordinates, not in array order: depth 0 is the end of the scan
with the lowest coordinate along the patient axis the slice axis mostly runs along, in DICOM/ITK
LPS coordinates (x to the patient's left, y to posterior, z to the head). For an axial scan,
depth 0 is the feet end and depth 1 the head end, whether the file stores its slices head-first
or feet-first. The direction comes from what nnU-Net's reader recorded in the case's properties
(``sitk_stuff['direction']`` of the SimpleITK readers; ``nibabel_stuff``'s affine of the nibabel
readers, RAS, converted to LPS). Readers that record no orientation (PNG, TIFF) keep array order:
index 0 is depth 0. Scans stored feet-first with an identity direction (the Cardiac Fat data)
get the same depths as under the array-order rule of version 0.2.

A scan with a single slice has no depth axis; it gets 0.5 (the middle), and callers log it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEPTH_KEY = "depth_channel"
SINGLE_SLICE_DEPTH = 0.5


def slice_depths(n_slices: int, shape_before_cropping: Sequence[int],
                 bbox_used_for_cropping: Sequence[Sequence[int]]) -> np.ndarray:
    """Normalised depth (float64, ``n_slices`` values) of every slice of a preprocessed case, in
    array order (:func:`depths_from_properties` turns it into patient order).

    ``n_slices`` is the length of the preprocessed case's first axis; the two properties are
    nnU-Net's (first axis = slice axis after transposition). If the slice axis was resampled
    (``n_slices`` differs from the cropped extent), slice centres are mapped linearly.

    >>> slice_depths(3, (10, 64, 64), [[4, 7], [0, 64], [0, 64]]).round(3).tolist()  # slices 4..6 of 10
    [0.444, 0.556, 0.667]
    """
    total = int(shape_before_cropping[0])
    lo, hi = (int(v) for v in bbox_used_for_cropping[0])
    n = int(n_slices)
    if n < 1 or total < 1 or not 0 <= lo < hi <= total:
        raise ValueError(f"inconsistent slice geometry: {n} preprocessed slices, cropping box {lo}:{hi} "
                         f"of a scan with {total} slices")
    if total == 1:
        return np.full(n, SINGLE_SLICE_DEPTH)
    index = lo + (np.arange(n) + 0.5) * ((hi - lo) / n) - 0.5
    return np.clip(index / (total - 1), 0.0, 1.0)


def slice_axis_direction(properties: dict, slice_axis: int) -> np.ndarray | None:
    """Unit-free LPS direction (3 values) in which array index increases along ``slice_axis`` (an
    axis of the array nnU-Net's reader returned, channels excluded: 0, 1 or 2), from the reader's
    properties; None when the reader records no orientation or the image is 2D.

    >>> props = {"sitk_stuff": {"direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)}}  # stored head-first
    >>> slice_axis_direction(props, 0).tolist()  # array axis 0 is ITK's z axis
    [0.0, 0.0, -1.0]
    """
    sitk_stuff = properties.get("sitk_stuff") or {}
    nib_stuff = properties.get("nibabel_stuff") or {}
    if "direction" in sitk_stuff:
        flat = np.asarray(sitk_stuff["direction"], dtype=float)
        dim = int(round(np.sqrt(flat.size)))
        if dim < 3 or dim * dim != flat.size:
            return None
        # SimpleITK arrays are (z, y, x): array axis a is ITK axis 2 - a (ITK axis 3, if any, is channels)
        return flat.reshape(dim, dim)[:3, 2 - slice_axis]
    affine = nib_stuff.get("reoriented_affine", nib_stuff.get("original_affine"))
    if affine is not None:
        # nnU-Net's nibabel readers transpose (x, y, z) to (z, y, x) too; nibabel's world is RAS
        return np.asarray(affine, dtype=float)[:3, 2 - slice_axis] * np.array([-1.0, -1.0, 1.0])
    return None


def slice_order_reversed(properties: dict, slice_axis: int) -> bool:
    """True when the slices are stored with decreasing patient coordinate (for an axial scan:
    head-first), so depth must count from the other end of the array.

    >>> slice_order_reversed({"sitk_stuff": {"direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)}}, 0)
    True
    >>> slice_order_reversed({}, 0)  # no orientation recorded (PNG, TIFF): array order
    False
    """
    direction = slice_axis_direction(properties, slice_axis)
    if direction is None or not np.any(direction):
        return False
    return bool(direction[int(np.argmax(np.abs(direction)))] < 0)


def depths_from_properties(n_slices: int, properties: dict, *, slice_axis: int) -> np.ndarray:
    """:func:`slice_depths` from an nnU-Net properties dict, in patient coordinates (see the module
    docstring), with an error naming what is missing. ``slice_axis`` is the reader's array axis that
    nnU-Net made the slice axis: the plans' ``transpose_forward[0]``.

    >>> props = {"shape_before_cropping": (5, 8, 8), "bbox_used_for_cropping": [[0, 5], [0, 8], [0, 8]]}
    >>> depths_from_properties(5, props, slice_axis=0).tolist()
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> props["sitk_stuff"] = {"direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)}  # the same scan stored head-first
    >>> depths_from_properties(5, props, slice_axis=0).tolist()
    [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    missing = [k for k in ("shape_before_cropping", "bbox_used_for_cropping") if k not in properties]
    if missing:
        raise KeyError(f"the depth channel needs nnU-Net's preprocessing properties {missing}; "
                       f"they are written by nnU-Net's preprocessor (re-run nnUNetv2_preprocess)")
    depths = slice_depths(n_slices, properties["shape_before_cropping"], properties["bbox_used_for_cropping"])
    return 1.0 - depths if slice_order_reversed(properties, slice_axis) else depths


def append_depth_channel(image, depth):
    """``image`` (C, *spatial) with one more channel holding ``depth``.

    ``depth`` is a scalar (one slice: every pixel gets it) or one value per index of the first
    spatial axis (a stack of slices). Works on numpy arrays and on torch tensors on any device;
    the result has the image's type, dtype and device.

    >>> image = np.zeros((1, 4, 4), np.float32)  # (C, H, W): one slice
    >>> out = append_depth_channel(image, 0.25)
    >>> out.shape, float(out[1].min()), float(out[1].max())
    ((2, 4, 4), 0.25, 0.25)
    """
    if isinstance(image, torch.Tensor):
        d = torch.as_tensor(np.asarray(depth, dtype=np.float64), dtype=image.dtype, device=image.device)
        view = (1, -1) + (1,) * (image.ndim - 2) if d.ndim == 1 else (1,) * image.ndim
        channel = d.reshape(view).expand(1, *image.shape[1:])
        return torch.cat([image, channel], dim=0)
    image = np.asarray(image)
    d = np.asarray(depth, dtype=image.dtype if image.dtype.kind == "f" else np.float32)
    view = (1, -1) + (1,) * (image.ndim - 2) if d.ndim == 1 else (1,) * image.ndim
    channel = np.broadcast_to(d.reshape(view), (1, *image.shape[1:]))
    return np.concatenate([image, channel.astype(np.result_type(image, d), copy=False)], axis=0)


def check_depth_applicable(patch_size: Sequence[int], median_shape: Sequence[float], where: str) -> None:
    """Raise a clear error where a depth channel has no meaning: 3D patches (the depth would vary
    inside the patch) and 2D datasets (every case is a single slice).

    >>> check_depth_applicable([64, 64], [40, 512, 512], "2d")  # 3D scans, 2D patches: fine
    >>> check_depth_applicable([64, 64], [1, 512, 512], "2d")
    Traceback (most recent call last):
    ...
    ValueError: 2d: this dataset is 2D (its cases have a single slice, ...), so a depth channel carries no ...
    """
    if len(patch_size) != 2:
        raise ValueError(f"{where}: the depth channel is for 2D networks on 3D scans; this configuration has a "
                         f"{len(patch_size)}D patch {list(patch_size)}. Use nnU-Net's '2d' configuration "
                         f"(or a 2d_sts_* one).")
    if len(median_shape) < 3 or float(median_shape[0]) <= 1:
        raise ValueError(f"{where}: this dataset is 2D (its cases have a single slice, median shape "
                         f"{[float(v) for v in median_shape]}), so a depth channel carries no information. "
                         f"Train it without the depth channel (nnUNetTrainer or nnUNetTrainer_StSCoarse).")


__all__ = ["DEPTH_KEY", "SINGLE_SLICE_DEPTH", "slice_depths", "slice_axis_direction", "slice_order_reversed",
           "depths_from_properties", "append_depth_channel", "check_depth_applicable"]
