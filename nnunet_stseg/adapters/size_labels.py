"""Size labels in an nnU-Net raw dataset: the convention, its checker, an importer and a simulator
(the command: ``nnunet-stseg sizes``, :mod:`nnunet_stseg.commands.sizes`).

The convention (docs/design.md "Learning from object sizes"):
- A 2D nnU-Net raw dataset (one image per case, one object per image) whose ``dataset.json``
  has exactly one foreground label and nnU-Net's ``ignore`` label (the highest value).
- A training case with pixel labels has a label file without any ``ignore`` pixel. A size-only
  case has a label file made ENTIRELY of the ``ignore`` label (nnU-Net's own losses skip it, so
  every stock tool still reads the dataset) and an entry in ``object_sizes.json``.
- ``object_sizes.json`` next to ``dataset.json``: ``{"unit": "mm", "sizes": {"<case>": <size>}}``.
  The size is 2 x the largest chessboard distance of an object pixel to the background
  (:mod:`nnunet_stseg.core.sizes`) in millimetres; the trainer divides it by the configuration's
  in-plane spacing. Pixel-labelled cases may have a size too (checked against the label); the
  size loss of phase 2 uses it as well (the paper's phase 2 runs over the whole training set).
A label file partly made of ``ignore`` is refused: size supervision needs a case to be either
fully labelled or size-only.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_stseg.atomic import write_json_atomic

SIZES_FILE = "object_sizes.json"
ISOTROPY_TOLERANCE = 0.01  # in-plane spacings may differ by 1 %: a chessboard size in mm needs square pixels


class SizeLabelError(ValueError):
    """A size-labelled dataset that does not follow the convention; the message names the file."""


@dataclass
class SizeDatasetReport:
    """What :func:`check_size_dataset` found."""

    pixel_cases: list[str] = field(default_factory=list)
    size_only_cases: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    spacing_mm: float | None = None

    def summary(self) -> str:
        return (f"{len(self.pixel_cases)} pixel-labelled case(s), {len(self.size_only_cases)} size-only case(s)"
                + (f"; in-plane spacing {self.spacing_mm:g} mm" if self.spacing_mm else ""))


def binary_labels(dataset_json: dict, where: str) -> tuple[int, int]:
    """(foreground value, ignore value) of a size-labelled dataset, or a clear error."""
    labels = dataset_json.get("labels", {})
    if "ignore" not in labels:
        raise SizeLabelError(f"{where}: dataset.json has no 'ignore' label; size-only cases are label files made "
                             f"entirely of it (add e.g. \"ignore\": 2 to 'labels')")
    ignore = labels["ignore"]
    others = {k: v for k, v in labels.items() if k not in ("background", "ignore")}
    if len(others) != 1 or any(not isinstance(v, int) for v in others.values()):
        raise SizeLabelError(f"{where}: size supervision needs exactly one foreground label (one object class), "
                             f"dataset.json has {sorted(others)}")
    foreground = next(iter(others.values()))
    if not isinstance(ignore, int) or ignore <= max(foreground, labels.get("background", 0)):
        raise SizeLabelError(f"{where}: the ignore label must be the highest label value (nnU-Net's rule)")
    return foreground, ignore


def read_sizes(dataset_folder: str | Path) -> dict[str, float]:
    """``{case: size in mm}`` from ``object_sizes.json``, validated (unit, positive finite numbers)."""
    path = Path(dataset_folder) / SIZES_FILE
    if not path.is_file():
        raise SizeLabelError(f"{path}: not found; size-only cases need their sizes there "
                             f"({{\"unit\": \"mm\", \"sizes\": {{\"case\": 12.5}}}})")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SizeLabelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(content, dict) or content.get("unit") != "mm" or not isinstance(content.get("sizes"), dict):
        raise SizeLabelError(f"{path}: expected {{\"unit\": \"mm\", \"sizes\": {{case: size}}}}")
    sizes = {}
    for case, value in content["sizes"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SizeLabelError(f"{path}: case {case}: size {value!r} is not a number >= 0 (millimetres)")
        sizes[str(case)] = float(value)
    return sizes


def _reader(dataset_folder: Path, dataset_json: dict):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    labels = sorted((dataset_folder / "labelsTr").glob(f"*{dataset_json['file_ending']}"))
    example = str(labels[0]) if labels else None
    return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()


def in_plane_spacing(spacing, where: str) -> float:
    """The in-plane pixel size (mm) of nnU-Net spacing values (last two axes), or an error naming
    ``where`` when the pixels are not square (1 % tolerance)."""
    sy, sx = (float(v) for v in list(spacing)[-2:])
    if abs(sy - sx) > ISOTROPY_TOLERANCE * max(sy, sx):
        raise SizeLabelError(f"{where}: in-plane spacing {sy:g} x {sx:g} mm is not square; a chessboard size in "
                             f"millimetres needs square pixels (resample the case first)")
    return (sy + sx) / 2


def case_ids(dataset_folder: Path, dataset_json: dict) -> list[str]:
    ending = dataset_json["file_ending"]
    return sorted(p.name[:-len(ending)] for p in (dataset_folder / "labelsTr").glob(f"*{ending}"))


def check_size_dataset(dataset_folder: str | Path) -> SizeDatasetReport:
    """Check a size-labelled raw dataset against the convention; raises :class:`SizeLabelError`
    listing every problem, each naming its case and file."""
    from nnunet_stseg.core.sizes import object_size

    folder = Path(dataset_folder)
    if not (folder / "dataset.json").is_file():
        raise SizeLabelError(f"{folder}: no dataset.json (not an nnU-Net raw dataset folder)")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    foreground, ignore = binary_labels(dataset_json, str(folder / "dataset.json"))
    sizes = read_sizes(folder)
    ids = case_ids(folder, dataset_json)
    problems, report = [], SizeDatasetReport()
    for case in sorted(set(sizes) - set(ids)):
        problems.append(f"{folder / SIZES_FILE}: case {case} has a size but no label file in labelsTr")
    reader = _reader(folder, dataset_json)
    spacings = []
    for case in tqdm(ids, desc=f"checking {folder.name}", disable=len(ids) < 200):
        path = folder / "labelsTr" / f"{case}{dataset_json['file_ending']}"
        seg, props = reader.read_seg(str(path))
        seg = seg[0]
        if seg.shape[0] != 1:
            problems.append(f"{path}: {seg.shape[0]} slices; size supervision is 2D (one image, one object per case)")
            continue
        try:
            spacing = in_plane_spacing(props["spacing"], str(path))
        except SizeLabelError as e:
            problems.append(str(e))
            continue
        spacings.append(spacing)
        values = np.unique(seg)
        unknown = sorted(set(values.tolist()) - {0, foreground, ignore})
        if unknown:
            problems.append(f"{path}: label values {unknown} are not background, {foreground} or ignore ({ignore})")
            continue
        ignored = seg == ignore
        if ignored.all():
            if case not in sizes:
                problems.append(f"{path}: size-only case (all ignore) without a size in {SIZES_FILE}")
                continue
            extent = 2 * max(seg.shape[1:]) * spacing
            if sizes[case] > extent:
                problems.append(f"{folder / SIZES_FILE}: case {case}: size {sizes[case]:g} mm is larger than its image "
                                f"allows ({extent:g} mm)")
                continue
            report.size_only_cases.append(case)
        elif ignored.any():
            problems.append(f"{path}: {int(ignored.sum())} of {ignored.size} pixels are 'ignore'; a case is either fully "
                            f"labelled or size-only (all ignore)")
        else:
            report.pixel_cases.append(case)
            if case in sizes:
                import torch

                measured = float(object_size(torch.from_numpy(seg[0] == foreground)[None])[0]) * spacing
                if abs(measured - sizes[case]) > max(2 * spacing, 0.1 * measured):
                    report.warnings.append(f"{case}: size {sizes[case]:g} mm in {SIZES_FILE}, its label measures "
                                           f"{measured:g} mm (the pixel loss uses the label, the size loss this size)")
    if not report.pixel_cases and not problems:
        problems.append(f"{folder}: no pixel-labelled training case; phase 1 of size supervision needs some")
    if problems:
        raise SizeLabelError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    report.spacing_mm = float(np.median(spacings)) if spacings else None
    return report


def size_only_label(reader, image_file: Path, ignore: int):
    """An all-``ignore`` label with the geometry of ``image_file``: (array (Z, H, W), properties)."""
    image, props = reader.read_images([str(image_file)])
    return np.full(image.shape[1:], ignore, dtype=np.uint8), props


def import_sizes(dataset_folder: str | Path, csv_file: str | Path) -> SizeDatasetReport:
    """Add size-only cases from a CSV (``case_id,size_mm`` with a header): every listed case that
    has an image in ``imagesTr`` but no label gets an all-``ignore`` label with the image's
    geometry; all sizes are merged into ``object_sizes.json``. Then the dataset is checked."""
    folder = Path(dataset_folder)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    _, ignore = binary_labels(dataset_json, str(folder / "dataset.json"))
    ending = dataset_json["file_ending"]
    rows = {}
    with open(csv_file, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows[row["case_id"].strip()] = float(row["size_mm"])
            except (KeyError, TypeError, ValueError):
                raise SizeLabelError(f"{csv_file}: line {i}: expected columns case_id,size_mm with a number, "
                                     f"got {row}") from None
    reader = _reader(folder, dataset_json)
    for case in rows:
        label = folder / "labelsTr" / f"{case}{ending}"
        if label.exists():
            continue
        image = folder / "imagesTr" / f"{case}_0000{ending}"
        if not image.is_file():
            raise SizeLabelError(f"{csv_file}: case {case}: no image {image}")
        seg, props = size_only_label(reader, image, ignore)
        tmp = label.with_name(f".tmp_{label.name}")
        reader.write_seg(seg, str(tmp), props)
        os.replace(tmp, label)
    existing = read_sizes(folder) if (folder / SIZES_FILE).is_file() else {}
    write_json_atomic({"unit": "mm", "sizes": {**existing, **rows}}, folder / SIZES_FILE, indent=1)
    n_cases = len(case_ids(folder, dataset_json))
    if dataset_json.get("numTraining") != n_cases:
        write_json_atomic({**dataset_json, "numTraining": n_cases}, folder / "dataset.json", indent=1)
    return check_size_dataset(folder)


def simulate_size_labels(source: str | Path, target_root: str | Path, dataset_id: int, pixel_cases: list[str],
                         object_labels: list[int] | None = None, name: str | None = None,
                         cases: list[str] | None = None) -> Path:
    """A size-labelled copy of a fully labelled 2D raw dataset (to measure the method where the truth
    is known): ``pixel_cases`` keep their labels (binary: the union of ``object_labels``, default all
    foreground), every other training case (of ``cases``, default all) becomes size-only; every case's
    size, measured on its label, goes into ``object_sizes.json`` (pixel-labelled ones too). Images are
    linked, not copied; ``imagesTs``/``labelsTs`` are linked too (test labels made binary). Returns the
    new dataset folder."""
    import torch

    from nnunet_stseg.core.sizes import object_size

    source = Path(source)
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    reader = _reader(source, dataset_json)
    all_cases = case_ids(source, dataset_json) if cases is None else sorted(cases)
    unknown = sorted(set(pixel_cases) - set(all_cases))
    if unknown:
        raise SizeLabelError(f"{source}: pixel-labelled cases {unknown[:3]} are not training cases")
    labels = dataset_json["labels"]
    if object_labels is None:
        object_labels = sorted(v for k, v in labels.items() if k not in ("background", "ignore") and isinstance(v, int))
    name = name or f"{source.name.split('_', 1)[-1]}Sizes"
    out = Path(target_root) / f"Dataset{dataset_id:03d}_{name}"
    if out.exists():
        shutil.rmtree(out)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True)
    sizes, pixel = {}, set(pixel_cases)

    def binary(path: Path):
        seg, props = reader.read_seg(str(path))
        return np.isin(seg[0], object_labels).astype(np.uint8), props

    for case in all_cases:
        for img in sorted((source / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}")):
            (out / "imagesTr" / img.name).symlink_to(img.resolve())
        seg, props = binary(source / "labelsTr" / f"{case}{ending}")
        spacing = in_plane_spacing(props["spacing"], str(source / "labelsTr" / f"{case}{ending}"))
        sizes[case] = float(object_size(torch.from_numpy(seg[0].astype(bool))[None])[0]) * spacing
        reader.write_seg(seg if case in pixel else np.full_like(seg, 2), str(out / "labelsTr" / f"{case}{ending}"),
                         props)
    if (source / "labelsTs").is_dir():
        for sub in ("imagesTs", "labelsTs"):
            (out / sub).mkdir()
        for img in sorted((source / "imagesTs").glob(f"*{ending}")):
            (out / "imagesTs" / img.name).symlink_to(img.resolve())
        for lab in sorted((source / "labelsTs").glob(f"*{ending}")):
            seg, props = binary(lab)
            reader.write_seg(seg, str(out / "labelsTs" / lab.name), props)
    foreground_name = next((k for k, v in labels.items() if v == object_labels[0]), "object") \
        if len(object_labels) == 1 else "object"
    new_json = {k: v for k, v in dataset_json.items() if k not in ("labels", "regions_class_order")}
    new_json.update(labels={"background": 0, foreground_name: 1, "ignore": 2}, numTraining=len(all_cases),
                    description=f"size-labelled copy of {source.name}: {len(pixel)} pixel-labelled case(s), "
                                f"{len(all_cases) - len(pixel)} size-only")
    write_json_atomic(new_json, out / "dataset.json", indent=1)
    write_json_atomic({"unit": "mm", "sizes": {c: sizes[c] for c in all_cases}},
                      out / SIZES_FILE, indent=1)
    return out
