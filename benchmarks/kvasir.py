"""Kvasir-SEG (original distribution layout) -> nnU-Net v2 raw dataset, with the paper's split.

    python -m benchmarks.kvasir --src ../shared/data/kvasir-seg -d 720 --size 256   # the paper's protocol
    python -m benchmarks.kvasir --src ../shared/data/kvasir-seg -d 721              # native resolution

- A seeded 80/10/10 split of the sorted image ids (seed 0 by default): train + validation go to
  ``imagesTr`` (nnU-Net fold 0 = exactly this train/validation split, installed into
  ``splits_final.json`` by :func:`install_split`), test goes to ``imagesTs`` with ``labelsTs``.
  The split is also written to ``stseg_split.json`` in the dataset folder.
- Images are RGB PNG (one file, three channels, nnU-Net's ``NaturalImage2DIO``); masks are the
  source's 8-bit JPEG masks thresholded at 127 (the data README's rule), stored as 0/1 PNG.
- ``--size 256`` resizes every image to 256 x 256 (the paper's "full resolution"); the image is
  resampled with bilinear interpolation, the mask with bilinear interpolation of its grey values
  followed by the 127 threshold, so its edges are not blocky (the reference code used nearest
  neighbour for both). Without ``--size`` the original resolution is kept.
Files are written under temporary names and renamed, so an interrupted conversion leaves no
half-written image that looks valid.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.runner import install_splits, save_png_atomic
from nnunet_stseg.atomic import write_json_atomic

SPLIT_FILE = "stseg_split.json"


def kvasir_ids(src: str | Path) -> list[str]:
    """Sorted ids that have both an image and a mask; a clear error otherwise."""
    src = Path(src)
    images, masks = src / "images", src / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise FileNotFoundError(f"{src} is not a Kvasir-SEG folder: expected images/ and masks/ inside it")
    img_ids = {p.stem for p in images.glob("*.jpg")}
    mask_ids = {p.stem for p in masks.glob("*.jpg")}
    missing = sorted(img_ids ^ mask_ids)
    if missing:
        raise ValueError(f"{src}: {len(missing)} image(s) without mask or mask(s) without image, e.g. {missing[:3]}")
    if not img_ids:
        raise ValueError(f"{src}/images contains no .jpg image")
    return sorted(img_ids)


def split_ids(ids: Sequence[str], seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
              ) -> dict[str, list[str]]:
    """Seeded train/val/test split of the sorted ids (sizes rounded, test takes the rest)."""
    if abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    ids = sorted(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(round(fractions[0] * len(ids)))
    n_val = int(round(fractions[1] * len(ids)))
    pick = lambda idx: sorted(ids[i] for i in idx)  # noqa: E731
    return {"train": pick(order[:n_train]), "val": pick(order[n_train:n_train + n_val]),
            "test": pick(order[n_train + n_val:])}


def load_case(src: Path, case_id: str, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image (H, W, 3) and 0/1 uint8 mask (H, W), optionally resized to size x size."""
    from PIL import Image

    img = Image.open(src / "images" / f"{case_id}.jpg").convert("RGB")
    mask = Image.open(src / "masks" / f"{case_id}.jpg").convert("L")
    if mask.size != img.size:
        raise ValueError(f"{src / 'masks' / (case_id + '.jpg')}: mask size {mask.size} != image size {img.size}")
    if size is not None:
        img = img.resize((size, size), Image.BILINEAR)
        mask = mask.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8), (np.asarray(mask) > 127).astype(np.uint8)


def convert_kvasir(src: str | Path, raw_root: str | Path, dataset_id: int = 720, name: str | None = None,
                   size: int | None = 256, seed: int = 0, ids: Sequence[str] | None = None) -> Path:
    """Write the nnU-Net raw dataset and return its folder. ``ids`` restricts the conversion to a
    subset (tests); the split is always computed over the ids converted."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    src = Path(src)
    all_ids = kvasir_ids(src)
    if ids is not None:
        unknown = sorted(set(ids) - set(all_ids))
        if unknown:
            raise ValueError(f"ids not in {src}: {unknown[:3]}")
        all_ids = sorted(ids)
    split = split_ids(all_ids, seed)
    name = name or (f"KvasirSEG{size}" if size else "KvasirSEGNative")
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(c, "Tr") for c in split["train"] + split["val"]] + [(c, "Ts") for c in split["test"]]
    for case_id, part in tqdm(jobs, desc=f"Kvasir-SEG -> {out.name}"):
        image, mask = load_case(src, case_id, size)
        save_png_atomic(image, out / f"images{part}" / f"{case_id}_0000.png")
        save_png_atomic(mask, out / f"labels{part}" / f"{case_id}.png")
    generate_dataset_json(str(out), {0: "R", 1: "G", 2: "B"}, {"background": 0, "polyp": 1},
                          len(split["train"]) + len(split["val"]), ".png", dataset_name=name,
                          overwrite_image_reader_writer="NaturalImage2DIO",
                          description=f"Kvasir-SEG, {'resized to %dx%d' % (size, size) if size else 'native size'}, "
                                      f"seeded split (seed {seed}) in {SPLIT_FILE}")
    write_json_atomic({"seed": seed, **split}, out / SPLIT_FILE, indent=1)
    return out


def install_split(raw_dataset_folder: str | Path, preprocessed_dataset_folder: str | Path) -> Path:
    """Make nnU-Net's fold 0 the converter's train/validation split (``splits_final.json``)."""
    return install_splits([json.loads((Path(raw_dataset_folder) / SPLIT_FILE).read_text())],
                          preprocessed_dataset_folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvasir", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="Kvasir-SEG folder (images/, masks/)")
    p.add_argument("--raw_root", type=Path, default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset_id", type=int, default=720)
    p.add_argument("--size", type=int, default=None, help="resize to size x size (paper: 256); default native")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.raw_root is None:
        p.error("--raw_root not given and nnUNet_raw is not set")
    print(convert_kvasir(args.src, args.raw_root, args.dataset_id, size=args.size, seed=args.seed))


if __name__ == "__main__":
    main()
