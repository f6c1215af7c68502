"""DermIS and DermQuest skin-lesion atlases -> one nnU-Net v2 raw dataset each, with seeded
cross-validation folds (the thesis's data, seed 003, section 5.2.2).

    python -m benchmarks.skin --atlas dermis -d 750       # ../shared/data/skin-lesions/dermis
    python -m benchmarks.skin --atlas dermquest -d 751 --size 1024   # the thesis's resolution

- Source layout (the Waterloo skin cancer database): ``<atlas>/{melanoma,notmelanoma}/NAME_orig.jpg``
  (RGB photo) and ``NAME_contour.png`` (the lesion mask, 1-bit or 8-bit: thresholded at 127).
  Case ids are ``mel_NAME`` and ``non_NAME``; every photo must have its mask (a clear error otherwise).
- ``--size 512`` (default) resizes every photo to 512 x 512. The thesis resized to 1024 x 1024 "for
  ease", but its photos were 300-550 px (section 5.2.2), so 1024 only interpolated them; our copy of
  DermIS is about 550 x 400 and of DermQuest about 1640 x 1043, and 512 x 512 is the information the
  thesis had at a quarter of the pixels (on this CPU the end-to-end model's whole-image training
  batches cost 3.5 s per iteration at 1024 x 1024). Both atlases lose their aspect ratio, as in the
  thesis, so that S means the same downscaling for both and a model of one atlas predicts the
  other at the scale it was trained at. ``--size 0`` keeps the original size. The photo is resampled bilinearly (Pillow, antialiased
  when shrinking), the mask bilinearly on its grey values and thresholded at 127.
- All photos go to ``imagesTr``: the experiment is cross-validation. The folds are written to
  ``stseg_split.json``: a seeded ``k``-fold split stratified by melanoma / not melanoma (each class
  shuffled and dealt round the folds), and inside each fold's training photos a seeded validation
  share (``val_fraction``, at least one photo) for the plateau rule and checkpoint choice, so that
  nothing is chosen on the fold's test photos. :func:`install_folds` writes nnU-Net's
  ``splits_final.json`` from it (nnU-Net's fold f: train = the training photos minus the
  validation share, val = the validation share).
Files are written under temporary names and renamed: an interrupted conversion leaves no
half-written image that looks valid, and a rerun converts only what is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from benchmarks.runner import install_splits, save_png_atomic
from nnunet_stseg.atomic import write_json_atomic

ATLASES = ("dermis", "dermquest")
CLASSES = {"melanoma": "mel", "notmelanoma": "non"}
SPLIT_FILE = "stseg_split.json"
DATASET_NAMES = {"dermis": "DermIS", "dermquest": "DermQuest"}


def atlas_cases(src: str | Path) -> dict[str, tuple[Path, Path]]:
    """``{case id: (photo, mask)}`` of an atlas folder, sorted; a clear error when the folder is not
    an atlas or a photo has no mask (or a mask no photo)."""
    src = Path(src)
    if not any((src / c).is_dir() for c in CLASSES):
        raise FileNotFoundError(f"{src} is not a skin-lesion atlas folder: expected {' and/or '.join(CLASSES)}/ "
                                f"inside it")
    cases = {}
    for folder, prefix in CLASSES.items():
        photos = {p.name[:-len("_orig.jpg")]: p for p in (src / folder).glob("*_orig.jpg")}
        masks = {p.name[:-len("_contour.png")]: p for p in (src / folder).glob("*_contour.png")}
        unpaired = sorted(set(photos) ^ set(masks))
        if unpaired:
            raise ValueError(f"{src / folder}: {len(unpaired)} photo(s) without mask or mask(s) without photo "
                             f"(NAME_orig.jpg + NAME_contour.png), e.g. {unpaired[:3]}")
        cases.update({f"{prefix}_{name}": (photos[name], masks[name]) for name in photos})
    if not cases:
        raise ValueError(f"{src}: no NAME_orig.jpg photo in {' or '.join(CLASSES)}/")
    return dict(sorted(cases.items()))


def load_case(photo: Path, mask: Path, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 photo (H, W, 3) and 0/1 uint8 mask (H, W), resized to size x size unless None."""
    from PIL import Image

    img = Image.open(photo).convert("RGB")
    grey = Image.open(mask).convert("L")  # a 1-bit mask becomes 0/255, an 8-bit one stays as it is
    if grey.size != img.size:
        raise ValueError(f"{mask}: mask size {grey.size} != photo size {img.size} ({photo.name})")
    if size:
        img = img.resize((size, size), Image.BILINEAR)
        grey = grey.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8), (np.asarray(grey) > 127).astype(np.uint8)


def cv_folds(case_ids: list[str], k: int = 5, seed: int = 0, val_fraction: float = 0.125) -> list[dict]:
    """``k`` folds of ``{"test", "train", "val"}`` (sorted ids): each id is in exactly one test
    fold; classes (the id's prefix before ``_``) are dealt round the folds separately, so every fold
    holds both; ``val`` is a seeded ``val_fraction`` (at least 1) of the fold's other ids.

    >>> folds = cv_folds([f"mel_{i}" for i in range(4)] + [f"non_{i}" for i in range(6)], k=2, seed=1)
    >>> [len(f["test"]) for f in folds], sorted(folds[0]["test"] + folds[1]["test"]) == sorted(
    ...     [f"mel_{i}" for i in range(4)] + [f"non_{i}" for i in range(6)])
    ([5, 5], True)
    >>> all(set(f["val"]) <= set(sum((g["test"] for g in folds if g is not f), [])) for f in folds)
    True
    """
    if k < 2 or len(case_ids) < 2 * k:
        raise ValueError(f"{k}-fold cross-validation needs k >= 2 and at least {2 * k} cases, got {len(case_ids)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    test = [[] for _ in range(k)]
    start = 0
    for prefix in sorted({c.split("_", 1)[0] for c in case_ids}):
        members = sorted(c for c in case_ids if c.split("_", 1)[0] == prefix)
        for i, j in enumerate(rng.permutation(len(members))):
            test[(start + i) % k].append(members[j])
        start = (start + len(members)) % k  # the next class continues where this one stopped: even folds
    folds = []
    for f in range(k):
        rest = sorted(c for g in range(k) if g != f for c in test[g])
        n_val = max(1, int(round(val_fraction * len(rest))))
        val = sorted(rest[i] for i in rng.permutation(len(rest))[:n_val])
        folds.append({"test": sorted(test[f]), "train": sorted(set(rest) - set(val)), "val": val})
    return folds


def convert_atlas(src: str | Path, raw_root: str | Path, dataset_id: int, name: str | None = None,
                  size: int | None = 512, folds: int = 5, seed: int = 0, val_fraction: float = 0.125,
                  limit: int | None = None) -> Path:
    """Write the nnU-Net raw dataset of one atlas (all photos in ``imagesTr``) and its folds; returns
    the dataset folder. ``limit``: the first N cases of each class only (smoke runs and tests)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    from tqdm import tqdm

    src = Path(src)
    cases = atlas_cases(src)
    if limit:
        keep = {c for prefix in CLASSES.values() for c in sorted(x for x in cases if x.startswith(prefix + "_"))[:limit]}
        cases = {c: v for c, v in cases.items() if c in keep}
    name = name or DATASET_NAMES.get(src.name.lower(), src.name) + (f"{size}" if size else "Native")
    out = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case, (photo, mask) in tqdm(cases.items(), desc=f"{src.name} -> {out.name}"):
        image_file, label_file = out / "imagesTr" / f"{case}_0000.png", out / "labelsTr" / f"{case}.png"
        if image_file.is_file() and label_file.is_file():
            continue
        image, label = load_case(photo, mask, size)
        save_png_atomic(image, image_file)
        save_png_atomic(label, label_file)
    generate_dataset_json(str(out), {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, len(cases), ".png",
                          dataset_name=name, overwrite_image_reader_writer="NaturalImage2DIO",
                          description=f"{src.name} skin-lesion photos, {'resized to %dx%d' % (size, size) if size else 'native size'}, "
                                      f"seeded {folds}-fold split (seed {seed}) in {SPLIT_FILE}")
    write_json_atomic({"seed": seed, "val_fraction": val_fraction, "folds": cv_folds(list(cases), folds, seed,
                                                                                       val_fraction)},
                      out / SPLIT_FILE, indent=1)
    return out


def install_folds(raw_dataset_folder: str | Path, preprocessed_dataset_folder: str | Path) -> Path:
    """nnU-Net's ``splits_final.json`` from the converter's folds (train minus validation share, val)."""
    return install_splits(json.loads((Path(raw_dataset_folder) / SPLIT_FILE).read_text())["folds"],
                          preprocessed_dataset_folder)


def main(argv=None) -> None:
    from benchmarks.runner import command_parser, shared_data

    p = command_parser("skin", __doc__)
    p.add_argument("--atlas", required=True, help=f"{' or '.join(ATLASES)} (a folder of skin-lesions/ in --data), "
                                                  f"or the path of an atlas folder")
    p.add_argument("--raw_root", type=Path, default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset_id", type=int, required=True)
    p.add_argument("--size", type=int, default=512, help="resize to size x size (512; the thesis: 1024); 0 = native")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.raw_root is None:
        p.error("--raw_root not given and nnUNet_raw is not set")
    src = shared_data() / "skin-lesions" / args.atlas if args.atlas in ATLASES else Path(args.atlas)
    print(convert_atlas(src, args.raw_root, args.dataset_id, size=args.size or None, folds=args.folds, seed=args.seed))


if __name__ == "__main__":
    main()
