"""The polar round-trip benchmark: measure() on generated masks, the CLI on a fake data folder and
(if present) on a few real masks from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import polar_round_trip as prt

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ellipse(shape, centre, axes) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return ((yy - centre[0]) / axes[0]) ** 2 + ((xx - centre[1]) / axes[1]) ** 2 <= 1


# ----------------------------------------------------------------------------------------------
# measure() on generated masks
# ----------------------------------------------------------------------------------------------

def test_measure_large_ellipse_is_near_lossless_at_high_p_and_lossy_at_low_p():
    mask = _ellipse((256, 256), (120, 140), (70, 50))
    r = prt.measure([mask], sizes=[16, 512], min_pixels=25)
    assert r["sizes"] == [16, 512]
    assert r["dice"].shape == (1, 2)
    assert r["n_images"] == 1 and r["n_images_with_objects"] == 1 and r["n_skipped"] == 0
    assert r["areas"][0] == mask.sum()
    d16, d512 = r["dice"][0]
    assert d512 >= 0.99
    assert d16 < d512 - 0.02  # 16 angles x 16 radii visibly cut the outline
    assert np.all(r["ms"] > 0)


def test_measure_splits_components_and_skips_small_ones():
    mask = _ellipse((200, 300), (60, 70), (30, 40)) | _ellipse((200, 300), (140, 220), (35, 25))
    mask[190:194, 10:14] = True  # 16 pixels: below min_pixels
    mask[5:10, 290:295] = True  # 25 pixels: kept (not below)
    empty = np.zeros((50, 60), bool)
    r = prt.measure([("two", mask), ("none", empty)], sizes=[64, 256], min_pixels=25)
    assert len(r["areas"]) == 3
    assert r["n_skipped"] == 1
    assert sorted(r["areas"].tolist())[0] == 25
    assert r["n_images"] == 2 and r["n_images_with_objects"] == 1
    assert all(n.startswith("two #") for n in r["names"])
    assert r["shapes"] == {(200, 300): 1, (50, 60): 1}
    # each object is measured alone: the big ellipses round-trip well at 256
    big = r["areas"] > 1000
    assert np.all(r["dice"][big, 1] >= 0.98)
    # raising min_pixels skips the 25-pixel square too
    r2 = prt.measure([mask], sizes=[64], min_pixels=26)
    assert len(r2["areas"]) == 2 and r2["n_skipped"] == 2


def test_summary_and_smallest_p():
    r = {"sizes": [32, 64, 128], "dice": np.array([[0.90, 0.985, 0.999], [0.95, 0.995, 0.999]]),
         "ms": np.array([1.0, 2.0, 3.0])}
    rows = prt.summarise(r)
    assert [x["objects"] for x in rows] == [2, 2, 2]
    assert rows[1]["mean"] == pytest.approx(0.99)
    assert rows[1]["min"] == pytest.approx(0.985)
    assert rows[1]["frac"] == pytest.approx(0.5)
    assert rows[0]["p5"] == pytest.approx(np.percentile([0.90, 0.95], 5))
    assert prt.smallest_p(rows, "mean") == 64
    assert prt.smallest_p(rows, "p5") == 128
    assert prt.smallest_p(rows, "min", target=0.9999) is None
    empty = prt.summarise({"sizes": [8], "dice": np.zeros((0, 1)), "ms": np.zeros(1)})
    assert empty[0]["objects"] == 0 and prt.smallest_p(empty, "mean") is None


# ----------------------------------------------------------------------------------------------
# CLI on a fake data folder
# ----------------------------------------------------------------------------------------------

def _fake_data(root: Path, cardiac: bool = True, kvasir: bool = True) -> None:
    if cardiac:
        import SimpleITK as sitk

        vol = np.zeros((3, 64, 64), np.uint8)
        vol[1][_ellipse((64, 64), (30, 34), (18, 14))] = 1
        vol[2][_ellipse((64, 64), (32, 30), (20, 16))] = 2
        vol[2, 30:34, 30:34] = 1  # inside the ellipse: the same component
        d = root / prt.CARDIAC_DIR
        d.mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(d / "x.nii.gz"))
    if kvasir:
        from PIL import Image

        img = np.where(_ellipse((80, 100), (40, 45), (25, 30)), 255, 0).astype(np.uint8)
        d = root / prt.KVASIR_DIR
        d.mkdir(parents=True)
        Image.fromarray(img).convert("RGB").save(d / "a.jpg", quality=90)


def test_cli_end_to_end_on_fake_data(tmp_path, capsys):
    _fake_data(tmp_path / "data")
    out = tmp_path / "report" / "rt.md"
    prt.main(["--data", str(tmp_path / "data"), "--sizes", "32", "128", "--out", str(out)])
    png = out.with_name("polar_round_trip.png")
    assert out.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    assert "## Cardiac Fat CT" in text and "## Kvasir-SEG" in text
    assert "python -m benchmarks.polar_round_trip --data" in text and "--sizes 32 128" in text
    assert "no GPU used" in text and "wall time" in text
    assert "1 patients, 3 slices read, 2 with at least one object; 2 objects measured" in text
    assert "1 images, 1 masks read, 1 with at least one object; 1 objects measured" in text
    assert "all 1 images 80x100 (H x W)" in text
    assert text.count("| 32 |") == 2 and text.count("| 128 |") == 2
    assert text.count("smallest P with mean Dice") == 2
    assert not list(out.parent.glob(".tmp_*"))  # atomic writes leave no temp file


def test_cli_skips_a_missing_dataset_and_fails_when_both_are_missing(tmp_path, capsys):
    _fake_data(tmp_path / "data", cardiac=False)
    out = tmp_path / "rt.md"
    prt.main(["--data", str(tmp_path / "data"), "--sizes", "16", "--out", str(out), "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err
    assert "cardiac: no data in" in err and "skipping" in err
    text = out.read_text()
    assert "## Kvasir-SEG" in text and "## Cardiac" not in text
    assert "cardiac: not found under the data root, skipped" in text
    assert (tmp_path / "p.png").is_file()
    with pytest.raises(SystemExit, match="none of the datasets"):
        prt.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.md")])
    assert not (tmp_path / "x.md").exists()


def test_kvasir_subset_is_seeded(tmp_path):
    d = tmp_path / prt.KVASIR_DIR
    d.mkdir(parents=True)
    for i in range(10):
        (d / f"m{i}.jpg").touch()
    a = prt.kvasir_files(tmp_path, 4, seed=1)
    assert len(a) == 4 and a == sorted(a)
    assert a == prt.kvasir_files(tmp_path, 4, seed=1)
    assert len(prt.kvasir_files(tmp_path)) == 10
    assert {tuple(prt.kvasir_files(tmp_path, 4, seed=s)) for s in range(5)} != {tuple(a)}


# ----------------------------------------------------------------------------------------------
# real data (skipped without ../shared/data)
# ----------------------------------------------------------------------------------------------

def test_cli_on_a_few_real_masks(tmp_path):
    if not (REAL_DATA / prt.CARDIAC_DIR).is_dir() or not (REAL_DATA / prt.KVASIR_DIR).is_dir():
        pytest.skip(f"real data not found under {REAL_DATA} (needs {prt.CARDIAC_DIR} and {prt.KVASIR_DIR})")
    out = tmp_path / "real.md"
    prt.main(["--limit_cardiac", "1", "--limit_kvasir", "5", "--sizes", "64", "256", "--out", str(out)])
    text = out.read_text()
    assert "## Cardiac Fat CT" in text and "## Kvasir-SEG" in text
    assert "all " in text and "512x512" in text  # cardiac slices
    assert "5 images, 5 masks read" in text
    # real objects lose a little at 64 and almost nothing at 256: parse the mean-Dice column
    for section in text.split("## ")[1:]:
        means = {int(line.split("|")[1]): float(line.split("|")[3]) for line in section.splitlines()
                 if line.startswith("| 64 |") or line.startswith("| 256 |")}
        assert 0.9 < means[64] < means[256] <= 1.0
        assert means[256] >= 0.98
