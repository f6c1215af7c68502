"""The object-size paper's data: MSD hippocampus volumes as 48 x 32 slices, an nnU-Net raw dataset.

    python -m benchmarks.hippocampus --raw_root $nnUNet_raw            # Dataset780_HippocampusSlices

What the paper did (seed 004, section 4): 2D slices of 48 x 32 pixels from the 3D volumes, kept
when at least 1 % of the slice is foreground, the head and body labels merged into one object,
split 70/10/20 at random over slices. What this converter does, and where it differs:

- Slices along the first array axis of the NIfTI volumes as SimpleITK reads them (each slice is
  the volume's last two axes, about 50 x 35 voxels at 1 mm: the orientation in which 48 x 32
  needs the least cropping; the paper does not name its axis). Every slice is centre-cropped or
  zero-padded to 48 x 32 (a centre fixed by the image, never by the label), THEN the 1 % rule
  (>= 16 of 1536 pixels) is applied: 6103 slices from the 260 volumes here (the paper: 6093
  from 394 volumes, so its axis or crop kept fewer per volume).
- The split is seeded and BY VOLUME (70/10/20 of the volumes; all slices of a volume in one
  part), so no test slice has a neighbouring slice of the same head in training. The paper's
  random split over slices would put neighbours on both sides.
- Intensities: the volumes are float32 (up to 1.7e6) or uint8; each volume is scaled linearly
  to the uint16 range by its own maximum and written as a 16-bit PNG (nnU-Net's z-score
  normalisation per image makes the scale irrelevant; 65536 levels keep the precision).
- Labels: 1 = hippocampus (anterior + posterior), 8-bit PNG. Spacing 1 mm (NaturalImage2DIO).

Layout: ``imagesTr``/``labelsTr`` hold the training and validation slices, ``imagesTs``/``labelsTs``
the test slices, ``stseg_split.json`` the case lists and volumes of each part (nnU-Net's fold 0 =
train / val, :func:`benchmarks.kvasir.install_split`). Case names: ``<volume>_s<index>``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from benchmarks.kvasir import SPLIT_FILE
from benchmarks.runner import save_png_atomic
from nnunet_stseg.atomic import write_json_atomic

SLICE_SHAPE = (48, 32)
MIN_FOREGROUND = 0.01
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
DATASET_ID, SOURCE_ID = 780, 704


def centre_crop_or_pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` cut or zero-padded to ``shape`` around its centre, axis by axis (an odd surplus
    is cut / padded one more at the end).

    >>> centre_crop_or_pad(np.arange(5), (3,)).tolist(), centre_crop_or_pad(np.ones(2), (5,)).tolist()
    ([1, 2, 3], [0.0, 1.0, 1.0, 0.0, 0.0])
    """
    if array.ndim != len(shape):
        raise ValueError(f"array of {array.ndim} axes, shape {shape}")
    out = np.zeros(shape, dtype=array.dtype)
    src, dst = [], []
    for have, want in zip(array.shape, shape):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = array[tuple(src)]
    return out


def volume_slices(image: np.ndarray, label: np.ndarray, axis: int = 0, shape: tuple[int, int] = SLICE_SHAPE,
                  min_foreground: float = MIN_FOREGROUND) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The kept slices of one volume: ``[(index along axis, image (H, W), mask (H, W) bool)]``,
    every slice centre-cropped / padded to ``shape``, kept when its foreground (any label > 0)
    covers at least ``min_foreground`` of ``shape``.

    >>> lab = np.zeros((2, 50, 35), np.uint8); lab[1, 20:30, 10:20] = 2
    >>> [(i, im.shape, int(m.sum())) for i, im, m in volume_slices(np.ones((2, 50, 35)), lab)]
    [(1, (48, 32), 100)]
    """
    if image.shape != label.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and label {label.shape}: two volumes of the same shape expected")
    need = min_foreground * shape[0] * shape[1]
    out = []
    for i in range(image.shape[axis]):
        mask = centre_crop_or_pad(np.take(label, i, axis) > 0, shape)
        if mask.sum() >= need and mask.any():
            out.append((i, centre_crop_or_pad(np.take(image, i, axis), shape), mask))
    return out


def split_by_volume(volumes: list[str], seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS
                    ) -> dict[str, list[str]]:
    """Seeded train / val / test lists of volume names (rounded counts; test takes the remainder).

    >>> s = split_by_volume([f"v{i}" for i in range(10)], seed=0)
    >>> [len(s[k]) for k in ("train", "val", "test")]
    [7, 1, 2]
    """
    order = np.random.default_rng(seed).permutation(sorted(volumes)).tolist()
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def to_uint16(image: np.ndarray) -> np.ndarray:
    """A volume scaled linearly to 0..65535 by its own maximum (negative values clipped to 0)."""
    image = np.clip(image.astype(np.float64), 0, None)
    top = float(image.max())
    return np.zeros(image.shape, np.uint16) if top <= 0 else np.rint(image / top * 65535).astype(np.uint16)


def convert_hippocampus(src: str | Path, raw_root: str | Path, dataset_id: int = DATASET_ID, seed: int = 0,
                        limit: int | None = None) -> Path:
    """Write the slice dataset (see the module docstring) and return its folder; an existing one
    (its ``dataset.json`` is written last) is returned as it is."""
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    src = Path(src)
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_HippocampusSlices"
    if (out / "dataset.json").is_file():
        return out
    labels = sorted((src / "labelsTr").glob("*.nii.gz"))
    if not labels:
        raise FileNotFoundError(f"{src}: no labelsTr/*.nii.gz; expected the MSD hippocampus raw dataset "
                                f"(Dataset{SOURCE_ID}_Hippocampus)")
    volumes = [p.name[:-len(".nii.gz")] for p in labels][:limit]
    split = split_by_volume(volumes, seed)
    part_of = {v: part for part, vs in split.items() for v in vs}
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cases: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for volume in tqdm(volumes, desc="hippocampus slices", mininterval=5):
        image_file = src / "imagesTr" / f"{volume}_0000.nii.gz"
        if not image_file.is_file():
            raise FileNotFoundError(f"{image_file}: the image of label {volume}.nii.gz is missing")
        image = to_uint16(sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "labelsTr" / f"{volume}.nii.gz")))
        if image.shape != label.shape:
            raise ValueError(f"{image_file}: shape {image.shape} differs from its label's {label.shape}")
        suffix = "Ts" if part_of[volume] == "test" else "Tr"
        for index, slice_image, mask in volume_slices(image, label):
            case = f"{volume}_s{index:02d}"
            save_png_atomic(slice_image, out / f"images{suffix}" / f"{case}_0000.png")
            save_png_atomic(mask.astype(np.uint8), out / f"labels{suffix}" / f"{case}.png")
            cases[part_of[volume]].append(case)
    write_json_atomic({"seed": seed, "axis": 0, "shape": list(SLICE_SHAPE), "min_foreground": MIN_FOREGROUND,
                       "volumes": split, **cases}, out / SPLIT_FILE, indent=1)
    generate_dataset_json(str(out), {0: "MRI"}, {"background": 0, "hippocampus": 1},
                          len(cases["train"]) + len(cases["val"]), ".png", dataset_name=out.name.split("_", 1)[1],
                          overwrite_image_reader_writer="NaturalImage2DIO",
                          description=f"MSD Task04 hippocampus (Dataset{SOURCE_ID}) as 48 x 32 slices along the first "
                                      f"array axis, >= 1 % foreground, labels merged; seeded split by volume "
                                      f"(seed {seed}) in {SPLIT_FILE}; imagesTs = the test volumes' slices")
    return out


def main(argv=None) -> None:
    from benchmarks.runner import raw_dataset, shared_data

    p = argparse.ArgumentParser(prog="python -m benchmarks.hippocampus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None,
                   help=f"the raw Dataset{SOURCE_ID}_Hippocampus folder (default: nnUNet_raw/ of the data folder)")
    p.add_argument("--raw_root", type=Path, default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder to write into (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset_id", type=int, default=DATASET_ID)
    p.add_argument("--seed", type=int, default=0, help="seed of the split by volume (0)")
    args = p.parse_args(argv)
    if args.raw_root is None:
        p.error("--raw_root or $nnUNet_raw is needed")
    src = args.src or raw_dataset(shared_data() / "nnUNet_raw", SOURCE_ID)
    if src is None:
        p.error(f"Dataset{SOURCE_ID}_Hippocampus not found under {shared_data() / 'nnUNet_raw'}; pass --src")
    out = convert_hippocampus(src, args.raw_root, args.dataset_id, args.seed)
    print(out)


if __name__ == "__main__":
    main()
