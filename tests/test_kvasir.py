"""Kvasir-SEG conversion: the split is the paper's protocol and nnU-Net reads what we write.
The conversion tests use the real data in ../shared/data/kvasir-seg and skip without it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.kvasir import convert_kvasir, install_split, kvasir_ids, split_ids

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"
needs_data = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")


def test_split_is_seeded_disjoint_and_80_10_10():
    ids = [f"case{i:04d}" for i in range(1000)]
    a, b = split_ids(ids, seed=0), split_ids(list(reversed(ids)), seed=0)
    assert a == b, "the split depends only on the set of ids and the seed"
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (800, 100, 100)
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(ids)
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert split_ids(ids, seed=1) != a
    with pytest.raises(ValueError, match="sum to 1"):
        split_ids(ids, fractions=(0.8, 0.1, 0.2))


def test_not_a_kvasir_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/ and masks/"):
        kvasir_ids(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="without mask"):
        kvasir_ids(tmp_path)


@needs_data
@pytest.mark.parametrize("size", [256, None])
def test_conversion_reads_back_through_nnunet(tmp_path, size):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from PIL import Image

    ids = kvasir_ids(KVASIR)[:20]
    out = convert_kvasir(KVASIR, tmp_path, 720, size=size, ids=ids)
    split = json.loads((out / "stseg_split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (16, 2, 2)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 18 and ds["file_ending"] == ".png" and ds["labels"] == {"background": 0, "polyp": 1}
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.png" for c in split["test"]]
    assert not list(out.rglob(".tmp_*"))
    io = NaturalImage2DIO()
    for case in split["train"][:3] + split["test"][:1]:
        part = "Ts" if case in split["test"] else "Tr"
        img, _ = io.read_images([str(out / f"images{part}" / f"{case}_0000.png")])
        seg, _ = io.read_seg(str(out / f"labels{part}" / f"{case}.png"))
        w, h = Image.open(KVASIR / "images" / f"{case}.jpg").size
        expected = (size, size) if size else (h, w)
        assert img.shape == (3, 1, *expected) and seg.shape == (1, 1, *expected)
        assert set(np.unique(seg)) <= {0, 1} and seg.any(), "every Kvasir image has a polyp"
        if size is None:  # native size: the mask is the source mask thresholded at 127, exactly
            src = np.asarray(Image.open(KVASIR / "masks" / f"{case}.jpg").convert("L")) > 127
            assert np.array_equal(seg[0, 0].astype(bool), src)
    target = install_split(out, tmp_path / "pp" / out.name)
    folds = json.loads(target.read_text())
    assert folds == [{"train": split["train"], "val": split["val"]}]
