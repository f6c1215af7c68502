"""Tests for nnunet_stseg.data.synthetic: the synthetic dataset is the fixture for every integration test, so it must be
nnU-Net-readable, deterministic, and really have the non-trivial geometry it promises."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_stseg.data.synthetic import main, make_synthetic_dataset

from stand_ins import fork_instead_of_spawn

N_TRAIN, N_TEST = 3, 1

EXPECTED_GEOMETRY = {
    2: dict(size=(128, 96), spacing=(0.8, 0.7), origin=(12.5, -30.0), direction=(1.0, 0.0, 0.0, -1.0)),
    3: dict(size=(64, 64, 24), spacing=(0.9, 0.9, 2.5), origin=(-100.0, 50.0, 20.0),
            direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)),
}


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _case_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(image, label) for all train and test cases."""
    pairs = []
    for img_dir, lbl_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for lbl in sorted((folder / lbl_dir).iterdir()):
            pairs.append((folder / img_dir / lbl.name.replace(".nii.gz", "_0000.nii.gz"), lbl))
    return pairs


def _all_arrays(folder: Path) -> list[np.ndarray]:
    return [_read(p)[1] for pair in _case_pairs(folder) for p in pair]


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def dataset(request, tmp_path_factory) -> tuple[int, Path]:
    dim = request.param
    root = tmp_path_factory.mktemp(f"raw{dim}d")
    folder = make_synthetic_dataset(root, dataset_id=990 + dim, name="StSSynth", dim=dim,
                                    n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return dim, folder


def test_folder_and_file_names(dataset):
    dim, folder = dataset
    assert folder.name == f"Dataset{990 + dim:03d}_StSSynth"
    assert folder.is_dir()
    listing = {sub: sorted(p.name for p in (folder / sub).iterdir())
               for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    assert listing["imagesTr"] == [f"StSSynth_{i:03d}_0000.nii.gz" for i in range(N_TRAIN)]
    assert listing["labelsTr"] == [f"StSSynth_{i:03d}.nii.gz" for i in range(N_TRAIN)]
    # test ids continue after the training ids
    test_ids = range(N_TRAIN, N_TRAIN + N_TEST)
    assert listing["imagesTs"] == [f"StSSynth_{j:03d}_0000.nii.gz" for j in test_ids]
    assert listing["labelsTs"] == [f"StSSynth_{j:03d}.nii.gz" for j in test_ids]
    # nothing else (no leftover temp files from the atomic writes)
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr",
                                                        "labelsTs"]


def test_dataset_json(dataset):
    _, folder = dataset
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "synthetic"}
    assert dj["labels"] == {"background": 0, "object": 1}
    assert dj["numTraining"] == N_TRAIN
    assert dj["file_ending"] == ".nii.gz"


def test_geometry_matches_and_is_nontrivial(dataset):
    dim, folder = dataset
    exp = EXPECTED_GEOMETRY[dim]
    pairs = _case_pairs(folder)
    assert len(pairs) == N_TRAIN + N_TEST
    for img_path, lbl_path in pairs:
        img, arr = _read(img_path)
        lbl, lab = _read(lbl_path)
        assert img.GetDimension() == lbl.GetDimension() == dim
        assert arr.dtype == np.float32 and lab.dtype == np.uint8
        assert arr.shape == lab.shape == tuple(reversed(exp["size"]))
        # image and label identical geometry
        assert img.GetSize() == lbl.GetSize() == exp["size"]
        assert img.GetSpacing() == lbl.GetSpacing()
        assert img.GetOrigin() == lbl.GetOrigin()
        assert img.GetDirection() == lbl.GetDirection()
        # the non-trivial defaults (NIfTI stores float32, hence approx)
        np.testing.assert_allclose(img.GetSpacing(), exp["spacing"], rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), exp["origin"], atol=1e-5)
        np.testing.assert_allclose(img.GetDirection(), exp["direction"], atol=1e-6)
        assert not np.allclose(img.GetDirection(), np.eye(dim).ravel())
        assert len(set(np.round(img.GetSpacing(), 5))) > 1  # anisotropic
        assert not np.isnan(arr).any()


def test_content(dataset):
    dim, folder = dataset
    pairs = _case_pairs(folder)
    # first training case is background only
    first = _read(pairs[0][1])[1]
    assert not first.any()
    for img_path, lbl_path in pairs[1:]:
        arr = _read(img_path)[1]
        lab = _read(lbl_path)[1]
        values = set(np.unique(lab).tolist())
        assert values == {0, 1}, f"{lbl_path.name}: expected background and object, got {values}"
        # objects are fully inside the image (never touch the border)
        for axis in range(dim):
            assert not np.take(lab, [0, lab.shape[axis] - 1], axis=axis).any()
        # objects are clearly brighter than background (learnable)
        assert arr[lab == 1].mean() - arr[lab == 0].mean() > 2.0
        assert abs(float(arr[lab == 0].mean())) < 0.5


def test_nnunet_verify_dataset_integrity(dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _, folder = dataset
    with fork_instead_of_spawn():
        verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def test_nnunet_reader_geometry(dataset):
    """nnU-Net's own reader sees the (z, y, x) spacing we intended and the same grid for image and label."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    dim, folder = dataset
    img_path, lbl_path = _case_pairs(folder)[1]
    rw = SimpleITKIO()
    data, props = rw.read_images([str(img_path)])
    seg, seg_props = rw.read_seg(str(lbl_path))
    assert data.shape == seg.shape
    spacing_np_order = tuple(reversed(EXPECTED_GEOMETRY[dim]["spacing"]))
    np.testing.assert_allclose(props["spacing"][-dim:], spacing_np_order, rtol=1e-6)
    np.testing.assert_allclose(props["spacing"], seg_props["spacing"])


def _objects_drawn_on_the_whole_image(seed, shape, n_objects, radius, num_classes):
    """The drawing rule of the generator written over the whole image (as before 0.9.3): the
    generator now draws each object in its own box, and must draw the same images."""
    from nnunet_stseg.data import synthetic as s

    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    image = rng.normal(0.0, s._NOISE_STD, size=shape)
    for g, c, n in zip(grids, rng.uniform(-s._GRADIENT_AMPLITUDE, s._GRADIENT_AMPLITUDE, size=len(shape)), shape):
        image = image + c * (g / max(n - 1, 1) - 0.5)
    label = np.zeros(shape, np.uint8)
    max_r = [(n - 3) // 2 for n in shape]
    for _ in range(n_objects):
        for _attempt in range(s._PLACEMENT_RETRIES):
            semi = [min(float(rng.uniform(*radius)), float(m)) for m in max_r]
            centre = [int(rng.integers(int(np.ceil(r)) + 1, n - 1 - int(np.ceil(r)))) for r, n in zip(semi, shape)]
            grown = sum(((g - c) / (r + 1.0)) ** 2 for g, c, r in zip(grids, centre, semi)) <= 1.0
            if np.any(label[grown]):
                continue
            mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, semi)) <= 1.0
            cls = int(rng.integers(1, num_classes + 1))
            label[mask] = cls
            image[mask] += s._OBJECT_BASE_INTENSITY + cls
            break
    return image.astype(np.float32), label


@pytest.mark.parametrize("shape, n_objects, radius", [((40, 50, 60), 12, (3.0, 8.0)), ((64, 48), 30, (1.5, 9.0)),
                                                      ((21, 30, 30), 6, (4.0, 20.0))])
def test_objects_drawn_in_their_boxes_equal_the_whole_image_rule(shape, n_objects, radius):
    """Crowded images (retries, objects at the border margin, radii clipped to the image): the
    box-by-box drawing makes exactly the images of the whole-image rule."""
    from nnunet_stseg.data.synthetic import _make_case

    for seed in range(3):
        image, label = _make_case(np.random.default_rng(seed), shape, n_objects, radius, 3)
        ref_image, ref_label = _objects_drawn_on_the_whole_image(seed, shape, n_objects, radius, 3)
        np.testing.assert_array_equal(label, ref_label)
        np.testing.assert_array_equal(image, ref_image)
        assert label.any()


def test_determinism(tmp_path):
    kw = dict(dim=2, n_train=3, n_test=1, shape=(32, 40), radius=(3, 5))
    a = make_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    b = make_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    c = make_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    arrs_a, arrs_b, arrs_c = _all_arrays(a), _all_arrays(b), _all_arrays(c)
    assert len(arrs_a) == len(arrs_b) == len(arrs_c) == 8
    for x, y in zip(arrs_a, arrs_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(arrs_a, arrs_c))
    # labels (not only noise) differ too
    assert any(not np.array_equal(_read(la)[1], _read(lc)[1])
               for (_, la), (_, lc) in zip(_case_pairs(a)[1:], _case_pairs(c)[1:]))


def test_num_classes_2(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = make_synthetic_dataset(tmp_path, dim=2, n_train=6, n_test=2, num_classes=2,
                                    shape=(64, 64), objects_per_image=(3, 4), seed=1)
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "class_1": 1, "class_2": 2}
    seen = set()
    pairs = _case_pairs(folder)
    assert not _read(pairs[0][1])[1].any()
    for img_path, lbl_path in pairs[1:]:
        lab = _read(lbl_path)[1]
        vals = set(np.unique(lab).tolist())
        assert vals <= {0, 1, 2} and vals - {0}
        seen |= vals
    assert seen == {0, 1, 2}
    # class intensities are separable: class 2 is brighter than class 1
    imgs = np.concatenate([_read(p)[1].ravel() for p, _ in pairs])
    labs = np.concatenate([_read(p)[1].ravel() for _, p in pairs])
    assert imgs[labs == 2].mean() - imgs[labs == 1].mean() > 0.5
    with fork_instead_of_spawn():
        verify_dataset_integrity(str(folder), num_processes=1)


def test_overrides(tmp_path):
    folder = make_synthetic_dataset(tmp_path, dim=3, n_train=2, n_test=0, shape=(10, 20, 30), radius=(2, 3),
                                    spacing=(1.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0),
                                    direction=(1, 0, 0, 0, 0, 1, 0, -1, 0), empty_cases=0)
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == []
    for img_path, lbl_path in _case_pairs(folder):
        for p in (img_path, lbl_path):
            img, arr = _read(p)
            assert arr.shape == (10, 20, 30)
            np.testing.assert_allclose(img.GetSpacing(), (1.0, 2.0, 3.0))
            np.testing.assert_allclose(img.GetOrigin(), (1.0, 2.0, 3.0))
            np.testing.assert_allclose(img.GetDirection(), (1, 0, 0, 0, 0, 1, 0, -1, 0), atol=1e-6)
        assert _read(lbl_path)[1].any()  # empty_cases=0 -> every case has an object


def test_regenerate_removes_stale_cases(tmp_path):
    kw = dict(dim=2, shape=(32, 32), radius=(2, 4))
    make_synthetic_dataset(tmp_path, n_train=4, n_test=2, **kw)
    folder = make_synthetic_dataset(tmp_path, n_train=2, n_test=1, **kw)
    assert len(list((folder / "imagesTr").iterdir())) == 2
    assert len(list((folder / "labelsTr").iterdir())) == 2
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["StSSynth_002_0000.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 2


@pytest.mark.parametrize("kwargs", [
    dict(dim=4),
    dict(dim=2, shape=(10, 10, 10)),
    dict(dim=2, shape=(3, 40)),
    dict(dim=3, spacing=(1.0, 1.0)),
    dict(dim=2, direction=(1, 0, 0, 2)),  # not orthonormal
    dict(dim=2, objects_per_image=(3, 1)),
    dict(dim=2, num_classes=0),
    dict(dim=2, name="bad name"),
])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, **kwargs)


def test_main_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    main(["-d", "991", "--name", "Cli", "--dim", "2", "--n_train", "2", "--n_test", "1", "--seed", "3",
          "--num_classes", "2"])
    out = capsys.readouterr().out.strip()
    folder = tmp_path / "Dataset991_Cli"
    assert Path(out) == folder
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["numTraining"] == 2 and "class_2" in dj["labels"]
    assert (folder / "imagesTs" / "Cli_002_0000.nii.gz").is_file()
