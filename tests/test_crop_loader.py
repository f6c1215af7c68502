"""StSCropDataLoader: fine-stage training crops around ground-truth components.

Runs on the preprocessed full-resolution data of the planned synthetic datasets (conftest):
batch shapes, foreground in every crop of a non-empty case, the whole slice for the empty case,
box invariants, the rotation-margin enlargement about the box centre, determinism, and 3D.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from nnunet_stseg.adapters.config import StSConfig
from nnunet_stseg.core.geometry import component_boxes, crop_and_resample
from nnunet_stseg.trainers.sts_trainers import StSCropDataLoader

SEEDS = range(6)


def _setup(planned, config: str):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = planned.plans["configurations"][config]
    folder = str(planned.preprocessed_folder / cfg["data_identifier"])
    dataset = infer_dataset_class(folder)(folder)
    lm = PlansManager(planned.plans).get_label_manager(planned.dataset_json)
    sts = StSConfig.from_configuration(cfg)
    spacing = list(cfg["spacing"])
    spacing3 = spacing if len(spacing) == 3 else [1.0] + spacing
    return dataset, lm, sts, spacing3


def _loader(planned, config: str, patch, final, batch_size: int = 4, negative_fraction: float = 0.0
            ) -> StSCropDataLoader:
    """The loader of ``config``; object crops only unless ``negative_fraction`` says otherwise."""
    dataset, lm, sts, spacing3 = _setup(planned, config)
    return StSCropDataLoader(dataset, batch_size=batch_size, patch_size=patch, final_patch_size=final,
                             label_manager=lm, crop=replace(sts.crop, negative_fraction=negative_fraction),
                             spacing3=spacing3, transforms=None)


def _batch(loader, seed: int) -> dict:
    np.random.seed(seed)
    return loader.generate_train_batch()


def _case(loader, key):
    data, seg, _, _ = loader._data.load_case(key)
    return np.asarray(data[:], dtype=np.float32), np.asarray(seg[:])


def _fg_components(seg: np.ndarray, active) -> np.ndarray:
    return component_boxes(seg[0] > 0, active)[1]


def _record_boxes(loader) -> list:
    """Wrap the instance's sample_box so that the boxes it hands out can be checked."""
    recorded = []
    original = loader.sample_box

    def wrapper(key, shape, seg, rng):
        box = original(key, shape, seg, rng)
        recorded.append((key, tuple(shape), box.copy()))
        return box

    loader.sample_box = wrapper
    return recorded


@pytest.fixture(scope="module")
def loader_2d(planned_2d):
    return _loader(planned_2d, "2d_sts_fine_32", (32, 32), (32, 32))


def test_2d_batch_shapes(loader_2d):
    batch = _batch(loader_2d, 0)
    assert tuple(batch["data"].shape) == (4, 1, 32, 32)
    assert tuple(batch["target"].shape) == (4, 1, 32, 32)
    assert batch["data"].dtype == torch.float32
    assert len(batch["keys"]) == 4
    assert torch.isfinite(batch["data"]).all()
    assert set(torch.unique(batch["target"]).tolist()) <= {0, 1}


def test_2d_crops_of_cases_with_foreground_contain_foreground(loader_2d):
    seen_fg = seen_empty = 0
    for seed in SEEDS:
        batch = _batch(loader_2d, seed)
        for j, key in enumerate(batch["keys"]):
            _, seg = _case(loader_2d, key)
            if (seg > 0).any():
                seen_fg += 1
                assert (batch["target"][j] > 0).any(), f"seed {seed}: crop {j} of {key} has no foreground"
            else:
                seen_empty += 1
    assert seen_fg > 0


def test_2d_empty_case_gets_whole_slice(planned_2d, loader_2d):
    key = planned_2d.case_ids[0]
    data, seg = _case(loader_2d, key)
    assert not (seg > 0).any(), "the first synthetic training case is expected to be empty"
    shape = data.shape[1:]
    assert shape[0] == 1
    for seed in SEEDS:
        box = loader_2d.sample_box(key, shape, seg, np.random.default_rng(seed))
        assert box.shape == (1, 3, 2)
        np.testing.assert_array_equal(box[0], [[0, 1], [0, shape[1]], [0, shape[2]]])


def _check_boxes(loader, keys, n_draws: int = 25):
    for key in keys:
        data, seg = _case(loader, key)
        shape = np.array(data.shape[1:])
        comps = _fg_components(seg, loader.crop.active)
        if len(comps) == 0:
            continue
        centres = comps.mean(axis=2)  # (n, ndim) in edge coordinates
        hit = np.zeros(len(comps), dtype=bool)
        for seed in range(n_draws):
            box = loader.sample_box(key, tuple(shape), seg, np.random.default_rng(seed))
            assert box.shape == (1, len(shape), 2)
            b = box[0]
            assert np.issubdtype(b.dtype, np.integer)
            assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] <= shape) and np.all(b[:, 1] > b[:, 0]), (key, b, shape)
            inside = np.all((centres >= b[None, :, 0]) & (centres <= b[None, :, 1]), axis=1)
            assert inside.any(), f"{key}: box {b.tolist()} contains no component centre {centres.tolist()}"
            hit |= inside
            # inactive axes keep the component's own (single-slice) extent
            for ax in np.flatnonzero(~loader.crop.active):
                assert b[ax, 1] - b[ax, 0] == 1
        assert hit.all(), f"{key}: some components never sampled in {n_draws} draws"


def test_2d_sample_box_inside_image_and_contains_component_centre(planned_2d, loader_2d):
    _check_boxes(loader_2d, planned_2d.case_ids)


def test_2d_component_boxes_are_cached_per_case(planned_2d, loader_2d):
    key = planned_2d.case_ids[1]
    data, seg = _case(loader_2d, key)
    loader_2d.sample_box(key, data.shape[1:], seg, np.random.default_rng(0))
    first = loader_2d._box_cache[key]
    loader_2d.sample_box(key, data.shape[1:], seg, np.random.default_rng(1))
    assert loader_2d._box_cache[key] is first


def test_2d_loader_output_is_the_resampled_box(planned_2d):
    loader = _loader(planned_2d, "2d_sts_fine_32", (32, 32), (32, 32))
    recorded = _record_boxes(loader)
    batch = _batch(loader, 3)
    assert [r[0] for r in recorded] == list(batch["keys"])
    for j, (key, _, box) in enumerate(recorded):
        data, seg = _case(loader, key)
        img = crop_and_resample(torch.from_numpy(data), box, (1, 32, 32), "linear", padding_mode="zeros")[0, :, 0]
        lab = crop_and_resample(torch.from_numpy(seg.astype(np.float32)), box, (1, 32, 32), "nearest",
                                padding_mode="zeros")[0, :, 0]
        torch.testing.assert_close(batch["data"][j], img, atol=1e-4, rtol=1e-4)
        agree = (batch["target"][j].float() == lab.round()).float().mean().item()
        assert agree > 0.99, (key, agree)


def test_2d_larger_initial_patch_is_enlarged_about_the_centre(planned_2d):
    small = _loader(planned_2d, "2d_sts_fine_32", (32, 32), (32, 32))
    big = _loader(planned_2d, "2d_sts_fine_32", (46, 46), (32, 32))
    rec_small, rec_big = _record_boxes(small), _record_boxes(big)
    for seed in (0, 1, 2):
        b_small, b_big = _batch(small, seed), _batch(big, seed)
        assert tuple(b_big["data"].shape) == (4, 1, 46, 46)
        assert tuple(b_big["target"].shape) == (4, 1, 46, 46)
        assert list(b_small["keys"]) == list(b_big["keys"])
        # same seed -> same boxes; the network sees the centre 32 x 32 of the enlarged crop
        torch.testing.assert_close(b_big["data"][:, :, 7:39, 7:39], b_small["data"], atol=1e-4, rtol=1e-4)
        agree = (b_big["target"][:, :, 7:39, 7:39] == b_small["target"]).float().mean().item()
        assert agree > 0.99, agree
    for (k1, _, box1), (k2, shape, box2) in zip(rec_small, rec_big):
        assert k1 == k2
        np.testing.assert_array_equal(box1, box2)
    # directly: the enlarged box is the sampled box scaled by 46/32 about its centre
    key, shape, box = rec_big[-1]
    data, _ = _case(big, key)
    b = box[0].astype(float)
    centre, half = b.mean(axis=1), (b[:, 1] - b[:, 0]) / 2 * np.array([1.0, 46 / 32, 46 / 32])
    enlarged = np.stack([centre - half, centre + half], axis=1)[None]
    img = torch.from_numpy(data)
    crop46 = crop_and_resample(img, enlarged, (1, 46, 46), "linear", padding_mode="zeros")[0, :, 0]
    crop32 = crop_and_resample(img, box, (1, 32, 32), "linear", padding_mode="zeros")[0, :, 0]
    torch.testing.assert_close(crop46[:, 7:39, 7:39], crop32, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_big["data"][-1], crop46, atol=1e-4, rtol=1e-4)


def test_2d_negative_crops_hold_no_foreground_and_stay_inside_the_image(planned_2d):
    """negative_fraction 0.5 with nnU-Net's rotation margin (46 -> 32): about half the samples of
    cases with objects are negatives; the whole enlarged region read for each holds no foreground,
    lies inside the image, and the sample is that region resampled; its label is empty."""
    loader = _loader(planned_2d, "2d_sts_fine_32", (46, 46), (32, 32), negative_fraction=0.5)
    recorded, last = [], {}  # per sample: (key, the negative box it got or None)
    sample_negative, make_sample = loader.sample_negative, loader.make_sample

    def negative(key, shape, seg, rng):
        last["box"] = sample_negative(key, shape, seg, rng)
        return last["box"]

    def sample(key, *args):
        last["box"] = None
        out = make_sample(key, *args)
        recorded.append((key, last["box"]))
        return out

    loader.sample_negative, loader.make_sample = negative, sample
    n_with_objects = 0
    for seed in range(12):
        start = len(recorded)
        batch = _batch(loader, seed)
        assert [k for k, _ in recorded[start:]] == list(batch["keys"])
        for j, (key, box) in enumerate(recorded[start:]):
            data, seg = _case(loader, key)
            n_with_objects += bool((seg > 0).any())
            if box is None:
                continue
            box = box[0]
            shape = np.array(seg.shape[1:])
            assert np.all(box[:, 0] >= 0) and np.all(box[:, 1] <= shape) and box[0, 1] - box[0, 0] == 1
            region = loader._enlarged(box)
            lo = np.clip(np.floor(region[:, 0]).astype(int) - 1, 0, shape)
            hi = np.clip(np.ceil(region[:, 1]).astype(int) + 1, 0, shape)
            assert not (seg[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))] > 0).any(), (key, box)
            assert not (batch["target"][j] > 0).any()
            img = crop_and_resample(torch.from_numpy(data), region[None], (1, 46, 46), "linear",
                                    padding_mode="zeros")[0, :, 0]
            torch.testing.assert_close(batch["data"][j], img, atol=1e-4, rtol=1e-4)
    n_negative = sum(box is not None for _, box in recorded)
    assert 0.2 * n_with_objects <= n_negative <= 0.8 * n_with_objects, (n_negative, n_with_objects)


def test_2d_same_seed_same_batch(planned_2d, loader_2d):
    a, b = _batch(loader_2d, 7), _batch(loader_2d, 7)
    assert list(a["keys"]) == list(b["keys"])
    assert torch.equal(a["data"], b["data"])
    assert torch.equal(a["target"], b["target"])
    # a fresh loader on the same data agrees too (no hidden per-instance state)
    c = _batch(_loader(planned_2d, "2d_sts_fine_32", (32, 32), (32, 32)), 7)
    assert list(c["keys"]) == list(a["keys"]) and torch.equal(c["data"], a["data"])
    # a different seed gives a different batch
    d = _batch(loader_2d, 8)
    assert list(d["keys"]) != list(a["keys"]) or not torch.equal(d["data"], a["data"])


# ----------------------------------------------------------------------------------------------
# 3D
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loader_3d(planned_3d):
    return _loader(planned_3d, "3d_sts_fine_32", (32, 32, 32), (32, 32, 32))


def test_3d_batch_shapes_and_foreground(loader_3d):
    for seed in (0, 1, 2):
        batch = _batch(loader_3d, seed)
        assert tuple(batch["data"].shape) == (4, 1, 32, 32, 32)
        assert tuple(batch["target"].shape) == (4, 1, 32, 32, 32)
        for j, key in enumerate(batch["keys"]):
            _, seg = _case(loader_3d, key)
            if (seg > 0).any():
                assert (batch["target"][j] > 0).any(), f"seed {seed}: crop {j} of {key} has no foreground"


def test_3d_sample_box_inside_image_and_contains_component_centre(planned_3d, loader_3d):
    assert all(loader_3d.crop.active)
    _check_boxes(loader_3d, planned_3d.case_ids, n_draws=15)
    key = planned_3d.case_ids[0]
    data, seg = _case(loader_3d, key)
    assert not (seg > 0).any()
    box = loader_3d.sample_box(key, data.shape[1:], seg, np.random.default_rng(0))
    np.testing.assert_array_equal(box[0], [[0, s] for s in data.shape[1:]])


def test_3d_same_seed_same_batch(loader_3d):
    a, b = _batch(loader_3d, 5), _batch(loader_3d, 5)
    assert list(a["keys"]) == list(b["keys"])
    assert torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
