"""Tiny synthetic dataset in nnU-Net v2 raw format.

Used as the fixture for integration tests and for the demo: it lets the whole pipeline (planning, preprocessing,
training, inference, scoring) run in seconds without downloading anything.

The default geometry is deliberately *not* trivial (anisotropic spacing, non-zero origin, a flipped / permuted
direction matrix) so that code which silently drops or mixes up geometry (numpy vs. SimpleITK axis order, missing
direction handling, ...) produces visibly wrong results instead of passing by accident. The first training case(s)
contain no foreground at all, so the "empty label" code paths are exercised too.

Layout written (``{i:03d}`` case ids, test ids continue after the training ids)::

    raw_root/Dataset{dataset_id:03d}_{name}/
        dataset.json
        imagesTr/{name}_{i:03d}_0000.nii.gz
        labelsTr/{name}_{i:03d}.nii.gz
        imagesTs/{name}_{j:03d}_0000.nii.gz
        labelsTs/{name}_{j:03d}.nii.gz   # ground truth for scoring test predictions (not part of nnU-Net's format)

Only numpy and SimpleITK are imported at module level; nnU-Net is imported lazily inside the functions that need it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

FILE_ENDING = ".nii.gz"
CHANNEL_NAME = "synthetic"

# Defaults per dimensionality. shape is numpy order ((y, x) / (z, y, x)); spacing/origin are SimpleITK order
# ((x, y) / (x, y, z)); direction is the SimpleITK direction matrix flattened row-major.
_DEFAULTS: dict[int, dict] = {
    2: dict(
        shape=(96, 128),
        radius=(4.0, 10.0),
        spacing=(0.8, 0.7),
        origin=(12.5, -30.0),
        direction=(1.0, 0.0, 0.0, -1.0),  # y axis flipped
    ),
    3: dict(
        shape=(24, 64, 64),
        radius=(3.0, 7.0),
        spacing=(0.9, 0.9, 2.5),
        origin=(-100.0, 50.0, 20.0),
        direction=(0.0, 1.0, 0.0,  # x and y axes swapped, z flipped (orthonormal, det = +1)
                   1.0, 0.0, 0.0,
                   0.0, 0.0, -1.0),
    ),
}

# background noise / gradient / object parameters
_NOISE_STD = 0.3
_GRADIENT_AMPLITUDE = 0.5
_OBJECT_BASE_INTENSITY = 2.0
_PLACEMENT_RETRIES = 20


def _dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _label_dict(num_classes: int) -> dict[str, int]:
    """nnU-Net label map: a single class is called "object", several are "class_1".."class_k"."""
    if num_classes == 1:
        return {"background": 0, "object": 1}
    labels = {"background": 0}
    labels.update({f"class_{k}": k for k in range(1, num_classes + 1)})
    return labels


def _validate(dim: int, shape: tuple[int, ...], radius: tuple[float, float], spacing: tuple[float, ...],
              origin: tuple[float, ...], direction: tuple[float, ...], objects_per_image: tuple[int, int],
              num_classes: int, n_train: int, n_test: int, empty_cases: int, name: str) -> None:
    """Fail early with a clear message instead of producing a dataset nnU-Net later chokes on."""
    if len(shape) != dim:
        raise ValueError(f"shape {shape} must have {dim} entries for dim={dim}")
    if any(int(s) < 5 for s in shape):
        raise ValueError(f"every axis of shape must be >= 5 voxels so objects fit inside, got {shape}")
    if len(spacing) != dim or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must have {dim} positive entries, got {spacing}")
    if len(origin) != dim:
        raise ValueError(f"origin must have {dim} entries, got {origin}")
    if len(direction) != dim * dim:
        raise ValueError(f"direction must have {dim * dim} entries (row-major {dim}x{dim}), got {direction}")
    d = np.asarray(direction, dtype=float).reshape(dim, dim)
    if not np.allclose(d @ d.T, np.eye(dim), atol=1e-6):
        raise ValueError(f"direction must be an orthonormal matrix, got {d.tolist()}")
    if len(radius) != 2 or not (0 < radius[0] <= radius[1]):
        raise ValueError(f"radius must be (min, max) with 0 < min <= max, got {radius}")
    if len(objects_per_image) != 2 or not (0 <= objects_per_image[0] <= objects_per_image[1]):
        raise ValueError(f"objects_per_image must be (min, max) with 0 <= min <= max, got {objects_per_image}")
    if num_classes < 1 or num_classes > 250:
        raise ValueError(f"num_classes must be in 1..250 (labels are uint8), got {num_classes}")
    if n_train < 1 or n_test < 0 or empty_cases < 0:
        raise ValueError(f"need n_train >= 1, n_test >= 0, empty_cases >= 0; got {n_train}, {n_test}, {empty_cases}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        # the name ends up in folder and file names; keep it to characters every tool handles
        raise ValueError(f"name must be non-empty and contain only letters, digits, '_' or '-', got {name!r}")


def _make_case(rng: np.random.Generator, shape: tuple[int, ...], n_objects: int, radius: tuple[float, float],
               num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair (numpy order). Objects are axis-aligned ellipses/ellipsoids that lie fully inside the
    image with a 1-voxel margin and do not touch each other (so each object is its own connected component)."""
    dim = len(shape)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]

    # background: white noise plus a slow linear gradient in a random direction
    image = rng.normal(0.0, _NOISE_STD, size=shape)
    coeffs = rng.uniform(-_GRADIENT_AMPLITUDE, _GRADIENT_AMPLITUDE, size=dim)
    for g, c, s in zip(grids, coeffs, shape):
        image = image + c * (g / max(s - 1, 1) - 0.5)
    label = np.zeros(shape, dtype=np.uint8)

    # largest semi-axis per axis such that centre range [ceil(r)+1, s-2-ceil(r)] is non-empty
    max_r = [(s - 3) // 2 for s in shape]
    for _ in range(n_objects):
        for _attempt in range(_PLACEMENT_RETRIES):
            semi = [min(float(rng.uniform(radius[0], radius[1])), float(m)) for m in max_r]
            centre = [int(rng.integers(int(np.ceil(r)) + 1, s - 1 - int(np.ceil(r)))) for r, s in zip(semi, shape)]
            # the object's box (its grown footprint lies within r + 1 of the centre): the cost of an
            # object is its box's, not the image's (200 objects in a 1000 x 512 x 512 volume)
            box = tuple(slice(max(0, c - int(np.ceil(r)) - 2), min(s, c + int(np.ceil(r)) + 3))
                        for c, r, s in zip(centre, semi, shape))
            local = [g[tuple(b if d == a else slice(None) for d in range(dim))]
                     for a, (g, b) in enumerate(zip(grids, box))]
            dist = sum(((g - c) / r) ** 2 for g, c, r in zip(local, centre, semi))
            # the enlarged footprint (semi-axes + 1) must be free so objects never touch
            grown = sum(((g - c) / (r + 1.0)) ** 2 for g, c, r in zip(local, centre, semi)) <= 1.0
            if np.any(label[box][grown]):
                continue
            mask = dist <= 1.0  # always contains the (integer) centre voxel
            cls = int(rng.integers(1, num_classes + 1))
            label[box][mask] = cls
            image[box][mask] += _OBJECT_BASE_INTENSITY + cls
            break
        # if all retries failed we simply place fewer objects
    return image.astype(np.float32), label


def _write_atomic(arr: np.ndarray, target: Path, spacing: Sequence[float], origin: Sequence[float],
                  direction: Sequence[float]) -> None:
    """Write via a temporary file in the same folder + os.replace, so readers never see half-written files.
    The temp name keeps the .nii.gz ending so SimpleITK picks the NIfTI writer."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    tmp = target.parent / f".tmp_{target.name}"
    try:
        sitk.WriteImage(img, str(tmp), useCompression=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_dataset_json_atomic(folder: Path, num_classes: int, n_train: int, name: str, dim: int) -> None:
    """generate_dataset_json writes in place; let it write into a temp dir next to the target and move the result."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    tmpdir = Path(tempfile.mkdtemp(prefix=".tmp_dataset_json_", dir=folder))
    try:
        generate_dataset_json(
            str(tmpdir),
            channel_names={0: CHANNEL_NAME},
            labels=_label_dict(num_classes),
            num_training_cases=n_train,
            file_ending=FILE_ENDING,
            dataset_name=name,
            description=f"Synthetic {dim}D ellipse/ellipsoid dataset generated by nnunet_stseg.data.synthetic",
            license="CC0 (synthetic data)",
            converted_by="nnunet_stseg.data.synthetic",
        )
        os.replace(tmpdir / "dataset.json", folder / "dataset.json")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _remove_stale(subdir: Path, name: str, keep: set[str]) -> None:
    """Remove case files from an earlier generation (e.g. with a larger n_train) and leftover temp files; otherwise
    nnU-Net would count them as extra cases and numTraining would not match. Only touches names this module writes."""
    pattern = re.compile(rf"(\.tmp_)?{re.escape(name)}_\d{{3,}}(_0000)?{re.escape(FILE_ENDING)}")
    for f in subdir.iterdir():
        if f.is_file() and pattern.fullmatch(f.name) and f.name not in keep:
            f.unlink()


def make_synthetic_dataset(raw_root: str | Path, dataset_id: int = 990, name: str = "StSSynth", dim: int = 2,
                           n_train: int = 8, n_test: int = 2, shape: tuple[int, ...] | None = None,
                           objects_per_image: tuple[int, int] = (1, 3), radius: tuple[float, float] | None = None,
                           num_classes: int = 1, spacing: tuple[float, ...] | None = None,
                           origin: tuple[float, ...] | None = None, direction: tuple[float, ...] | None = None,
                           empty_cases: int = 1, seed: int = 0) -> Path:
    """Generate a small, deterministic nnU-Net v2 raw dataset and return its folder
    (``raw_root/Dataset{dataset_id:03d}_{name}``).

    Why: integration tests and the demo need a dataset that is tiny (fast), reproducible (``seed``), easy to learn
    (object intensity = 2 + class index on ~N(0, 0.3) background) and still geometrically non-trivial.

    shape is numpy order ((y, x) or (z, y, x)); spacing/origin are SimpleITK order ((x, y[, z])); direction is the
    SimpleITK direction matrix flattened row-major; radius is (min, max) semi-axis in voxels. ``None`` selects the
    per-dim defaults (see ``_DEFAULTS``). The first ``empty_cases`` training cases contain background only.
    Re-running into the same folder overwrites the dataset (stale case files from earlier runs are removed).
    """
    if dim not in _DEFAULTS:
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    defaults = _DEFAULTS[dim]
    shape = tuple(int(s) for s in (shape if shape is not None else defaults["shape"]))
    radius = tuple(float(r) for r in (radius if radius is not None else defaults["radius"]))
    spacing = tuple(float(s) for s in (spacing if spacing is not None else defaults["spacing"]))
    origin = tuple(float(o) for o in (origin if origin is not None else defaults["origin"]))
    direction = tuple(float(d) for d in (direction if direction is not None else defaults["direction"]))
    objects_per_image = (int(objects_per_image[0]), int(objects_per_image[1]))
    _validate(dim, shape, radius, spacing, origin, direction, objects_per_image, num_classes, n_train, n_test,
              empty_cases, name)

    folder = Path(raw_root) / _dataset_folder_name(dataset_id, name)
    subdirs = {k: folder / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for d in subdirs.values():
        d.mkdir(parents=True, exist_ok=True)

    expected: dict[str, set[str]] = {k: set() for k in subdirs}
    for i in range(n_train):
        expected["imagesTr"].add(f"{name}_{i:03d}_0000{FILE_ENDING}")
        expected["labelsTr"].add(f"{name}_{i:03d}{FILE_ENDING}")
    for j in range(n_train, n_train + n_test):
        expected["imagesTs"].add(f"{name}_{j:03d}_0000{FILE_ENDING}")
        expected["labelsTs"].add(f"{name}_{j:03d}{FILE_ENDING}")
    for k, d in subdirs.items():
        _remove_stale(d, name, expected[k])

    rng = np.random.default_rng(seed)
    geometry = (spacing, origin, direction)
    for idx in range(n_train + n_test):
        is_train = idx < n_train
        if is_train and idx < empty_cases:
            n_objects = 0
        else:
            n_objects = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
        image, label = _make_case(rng, shape, n_objects, radius, num_classes)
        img_dir, lbl_dir = (subdirs["imagesTr"], subdirs["labelsTr"]) if is_train else \
            (subdirs["imagesTs"], subdirs["labelsTs"])
        _write_atomic(image, img_dir / f"{name}_{idx:03d}_0000{FILE_ENDING}", *geometry)
        _write_atomic(label, lbl_dir / f"{name}_{idx:03d}{FILE_ENDING}", *geometry)

    _write_dataset_json_atomic(folder, num_classes, n_train, name, dim)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """CLI wrapper around make_synthetic_dataset; prints the created dataset folder."""
    parser = argparse.ArgumentParser(prog="python -m nnunet_stseg.data.synthetic",
                                     description="Generate a tiny synthetic nnU-Net v2 raw dataset "
                                                 "(ellipses/ellipsoids with non-trivial geometry).")
    parser.add_argument("--raw_root", type=str, default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    parser.add_argument("-d", "--dataset_id", type=int, default=990)
    parser.add_argument("--name", type=str, default="StSSynth")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--n_train", type=int, default=8)
    parser.add_argument("--n_test", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_classes", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.raw_root:
        parser.error("--raw_root not given and $nnUNet_raw is not set")
    folder = make_synthetic_dataset(args.raw_root, dataset_id=args.dataset_id, name=args.name, dim=args.dim,
                                    n_train=args.n_train, n_test=args.n_test, num_classes=args.num_classes,
                                    seed=args.seed)
    print(folder)


if __name__ == "__main__":
    main()
