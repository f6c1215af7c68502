"""Tests for nnunet_stseg.core.geometry: boxes, crops, resampling and fusion.

Unit tests pin hand-checked numbers; hypothesis properties check the invariants the rest of the
plugin relies on (boxes inside the image, kept objects covered, nearest crop -> paste is the
identity for boxes not larger than the patch, logical-OR fusion). Reference answers are computed
independently of the implementation wherever possible (e.g. connected components are re-derived
slice by slice instead of through :func:`connectivity_structure`).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import (CropParams, boxes_from_mask, component_boxes, connectivity_structure,
                                        crop_and_resample, fit_to_image, foreground_from_probabilities, jitter,
                                        keep_large_enough, probabilities_to_logits, recall_proposals,
                                        resample_crop_to_box, sample_negative_box, square_and_pad, whole_image_boxes)

PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPERTY_FEW = settings(max_examples=25, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------
# helpers (independent reference implementations)
# ----------------------------------------------------------------------------------------------

def ref_components(mask: np.ndarray, active) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected components without connectivity_structure: label every sub-array spanned by the
    active axes (one per index of the inactive axes) with full connectivity. Returns a list of
    (box (ndim, 2), voxel coordinates (M, ndim))."""
    mask = np.asarray(mask, dtype=bool)
    active = np.asarray(active, dtype=bool)
    nd = mask.ndim
    act, inact = np.flatnonzero(active), np.flatnonzero(~active)
    comps = []
    for idx in np.ndindex(*[mask.shape[a] for a in inact]):
        sl = [slice(None)] * nd
        for a, i in zip(inact, idx):
            sl[a] = i
        sub = mask[tuple(sl)]
        lab, n = ndimage.label(sub, structure=np.ones((3,) * sub.ndim, dtype=bool))
        for k in range(1, n + 1):
            coords = np.argwhere(lab == k)
            full = np.zeros((len(coords), nd), dtype=np.int64)
            full[:, act] = coords
            full[:, inact] = np.asarray(idx, dtype=np.int64)
            box = np.stack([full.min(0), full.max(0) + 1], axis=-1)
            comps.append((box, full))
    return comps


def box_key(box) -> tuple:
    return tuple(int(v) for v in np.asarray(box).ravel())


def random_mask(shape, seed: int, density: float, radius: int, active) -> np.ndarray:
    """Random binary mask with components of varied size: random seeds dilated by a box of a
    random per-axis radius (no growth along inactive axes)."""
    rng = np.random.default_rng(seed)
    seeds = rng.random(shape) < density
    if radius == 0:
        return seeds
    radii = [int(rng.integers(0, radius + 1)) if a else 0 for a in active]
    structure = np.ones([2 * r + 1 for r in radii], dtype=bool)
    return ndimage.binary_dilation(seeds, structure=structure)


def box_slices(box) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in np.asarray(box))


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return (labels[None] == np.arange(k).reshape((k,) + (1,) * labels.ndim)).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * (a & b).sum() / denom


# A geometry case: image shape and patch size (1 on inactive axes). Covers pure 2D, 2D-on-3D
# (patch (1, S, S)) and 3D, with anisotropic shapes.
@st.composite
def geometry_cases(draw, max_extent: int = 40, max_patch: int = 24):
    kind = draw(st.sampled_from(["2d", "2d_on_3d", "3d"]))
    if kind == "2d":
        shape = (draw(st.integers(4, max_extent)), draw(st.integers(4, max_extent)))
        active = (True, True)
    elif kind == "2d_on_3d":
        shape = (draw(st.integers(1, 8)), draw(st.integers(4, max_extent)), draw(st.integers(4, max_extent)))
        active = (False, True, True)
    else:
        shape = (draw(st.integers(3, 12)), draw(st.integers(4, max_extent // 2 + 4)),
                 draw(st.integers(4, max_extent // 2 + 4)))
        active = (True, True, True)
    patch = tuple(draw(st.integers(2, max_patch)) if a else 1 for a in active)
    return shape, patch


@st.composite
def boxes_within_patch(draw, shape, patch, max_boxes: int = 6):
    """Integer boxes inside the image that are no larger than the patch on any axis."""
    n = draw(st.integers(1, max_boxes))
    boxes = []
    for _ in range(n):
        box = []
        for length, p in zip(shape, patch):
            w = draw(st.integers(1, min(p, length)))
            a = draw(st.integers(0, length - w))
            box.append([a, a + w])
        boxes.append(box)
    return np.array(boxes, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# CropParams
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["margin_fraction", "margin_min", "min_object_size",
                                   "jitter_image_fraction", "jitter_box_fraction"])
def test_crop_params_negative_values_raise(field):
    with pytest.raises(ValueError, match=field):
        CropParams(patch_size=(64, 64), **{field: -0.5})


@pytest.mark.parametrize("patch", [(1, 1), (1, 1, 1), (0, 64), (64, -1), (1,)])
def test_crop_params_invalid_patch_raises(patch):
    with pytest.raises(ValueError):
        CropParams(patch_size=patch)


def test_crop_params_normalises_patch_and_active():
    p = CropParams(patch_size=[np.int64(1), 32, 48.0])
    assert p.patch_size == (1, 32, 48)
    assert all(type(v) is int for v in p.patch_size)
    np.testing.assert_array_equal(p.active, [False, True, True])
    np.testing.assert_array_equal(CropParams(patch_size=(16, 16, 16)).active, [True, True, True])
    # zero is allowed (only negative values are invalid)
    CropParams(patch_size=(8, 8), margin_fraction=0, margin_min=0, min_object_size=0,
               jitter_image_fraction=0, jitter_box_fraction=0)


def test_crop_params_is_frozen():
    p = CropParams(patch_size=(32, 32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.margin_min = 2.0  # type: ignore[misc]


def test_crop_params_dict_round_trip():
    p = CropParams(patch_size=(1, 96, 80), margin_fraction=0.2, margin_min=3.0, min_object_size=7.0,
                   jitter_image_fraction=0.1, jitter_box_fraction=0.3, square=False)
    d = p.to_dict()
    assert d["patch_size"] == [1, 96, 80]
    assert CropParams.from_dict(d) == p
    # survives JSON (plans files)
    assert CropParams.from_dict(json.loads(json.dumps(d))) == p
    assert CropParams.from_dict(CropParams(patch_size=(8, 8)).to_dict()) == CropParams(patch_size=(8, 8))


def test_crop_params_from_dict_unknown_key_raises_naming_it():
    d = CropParams(patch_size=(64, 64)).to_dict()
    d["margn_fraction"] = 0.3
    with pytest.raises(ValueError, match="margn_fraction"):
        CropParams.from_dict(d)


def test_crop_params_from_dict_validates():
    with pytest.raises(ValueError):
        CropParams.from_dict({"patch_size": [64, 64], "margin_min": -1})


# ----------------------------------------------------------------------------------------------
# connectivity_structure / component_boxes
# ----------------------------------------------------------------------------------------------

def test_connectivity_structure():
    np.testing.assert_array_equal(connectivity_structure([True, True]), np.ones((3, 3), bool))
    np.testing.assert_array_equal(connectivity_structure([True, True, True]), np.ones((3, 3, 3), bool))
    s = connectivity_structure([False, True, True])
    assert s.shape == (3, 3, 3)
    assert not s[0].any() and not s[2].any()
    assert s[1].all()
    s = connectivity_structure([True, False])
    np.testing.assert_array_equal(s, [[False, True, False]] * 3)


def test_component_boxes_hand_built_2d():
    mask = np.zeros((8, 10), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one component with 8-connectivity
    mask[4:7, 5:9] = True
    mask[5, 4] = True  # attached to the rectangle
    mask[7, 0] = True  # single pixel
    labels, boxes = component_boxes(mask, (True, True))
    assert boxes.dtype == np.int64
    assert boxes.shape == (3, 2, 2)
    np.testing.assert_array_equal(boxes, [[[1, 3], [1, 3]],
                                          [[4, 7], [4, 9]],
                                          [[7, 8], [0, 1]]])
    assert labels[1, 1] == labels[2, 2] == 1
    assert labels[5, 4] == labels[4, 5] == 2
    assert labels[7, 0] == 3
    np.testing.assert_array_equal(labels > 0, mask)


def test_component_boxes_inactive_axis_in_2d_array():
    # axis 0 inactive: diagonal neighbours across rows are separate, same-row neighbours join
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    mask[2, 2:5] = True
    _, boxes = component_boxes(mask, (False, True))
    assert sorted(box_key(b) for b in boxes) == sorted(
        [box_key([[0, 1], [0, 1]]), box_key([[1, 2], [1, 2]]), box_key([[2, 3], [2, 5]])])
    _, boxes = component_boxes(mask, (True, True))
    assert len(boxes) == 1
    np.testing.assert_array_equal(boxes[0], [[0, 3], [0, 5]])


def test_component_boxes_object_spanning_two_slices():
    mask = np.zeros((5, 12, 12), dtype=bool)
    mask[1:3, 2:9, 3:7] = True
    # 2D stage on a 3D volume: each slice is its own component, one slice thick
    _, boxes = component_boxes(mask, CropParams(patch_size=(1, 32, 32)).active)
    assert boxes.shape == (2, 3, 2)
    np.testing.assert_array_equal(boxes[:, 0], [[1, 2], [2, 3]])
    np.testing.assert_array_equal(boxes[:, 1], [[2, 9], [2, 9]])
    np.testing.assert_array_equal(boxes[:, 2], [[3, 7], [3, 7]])
    # 3D stage: one component two slices thick
    _, boxes = component_boxes(mask, CropParams(patch_size=(16, 32, 32)).active)
    np.testing.assert_array_equal(boxes, [[[1, 3], [2, 9], [3, 7]]])


def test_component_boxes_diagonal_across_slices_only_joins_in_3d():
    mask = np.zeros((3, 6, 6), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # 26-connected chain
    _, boxes = component_boxes(mask, (True, True, True))
    np.testing.assert_array_equal(boxes, [[[0, 3], [0, 3], [0, 3]]])
    _, boxes = component_boxes(mask, (False, True, True))
    assert len(boxes) == 3
    assert np.all(boxes[:, :, 1] - boxes[:, :, 0] == 1)


def test_component_boxes_empty_and_torch_and_mismatch():
    labels, boxes = component_boxes(np.zeros((4, 5, 6)), (True, True, True))
    assert boxes.shape == (0, 3, 2) and boxes.dtype == np.int64
    assert not labels.any()
    t = torch.zeros(6, 7, dtype=torch.uint8)
    t[2:4, 1:6] = 1
    labels, boxes = component_boxes(t, (True, True))
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(boxes, [[[2, 4], [1, 6]]])
    with pytest.raises(ValueError):
        component_boxes(np.zeros((4, 5)), (True, True, True))


@PROPERTY
@given(case=geometry_cases(), seed=st.integers(0, 2**31 - 1),
       density=st.sampled_from([0.002, 0.01, 0.05, 0.2]), radius=st.integers(0, 3))
def test_component_boxes_match_reference(case, seed, density, radius):
    shape, patch = case
    active = np.array([p > 1 for p in patch])
    mask = random_mask(shape, seed, density, radius, active)
    labels, boxes = component_boxes(mask, active)
    n = len(boxes)
    assert boxes.shape == (n, len(shape), 2)
    np.testing.assert_array_equal(labels > 0, mask)
    assert labels.max(initial=0) == n
    # boxes are exactly the bounding boxes of the returned labels (component i has label i + 1)
    for i, sl in enumerate(ndimage.find_objects(labels, max_label=n)):
        assert sl is not None
        np.testing.assert_array_equal(boxes[i], [[s.start, s.stop] for s in sl])
    # and the components are the right ones: same partition as the slice-wise reference
    ref = ref_components(mask, active)
    assert len(ref) == n
    seen = set()
    for _, coords in ref:
        vals = np.unique(labels[tuple(coords.T)])
        assert len(vals) == 1 and vals[0] > 0
        seen.add(int(vals[0]))
    assert len(seen) == n
    assert sorted(box_key(b) for b, _ in ref) == sorted(box_key(b) for b in boxes)
    # inactive axes: every box is one index thick
    for ax in np.flatnonzero(~active):
        assert np.all(boxes[:, ax, 1] - boxes[:, ax, 0] == 1)


# ----------------------------------------------------------------------------------------------
# keep_large_enough
# ----------------------------------------------------------------------------------------------

def _boxes_from_extents(extents, start=2):
    return np.array([[[start, start + e] for e in ext] for ext in extents], dtype=np.int64)


def test_keep_large_enough_five_pixel_rule_2d():
    params = CropParams(patch_size=(64, 64))
    boxes = _boxes_from_extents([(4, 10), (5, 5), (10, 4), (5, 100), (1, 1), (4, 4), (6, 5)])
    keep = keep_large_enough(boxes, (1.0, 1.0), params)
    assert keep.dtype == bool
    np.testing.assert_array_equal(keep, [False, True, False, True, False, False, True])


def test_keep_large_enough_is_in_physical_units():
    params = CropParams(patch_size=(64, 64))
    boxes = _boxes_from_extents([(4, 10), (5, 5)])
    # uniform spacing changes nothing
    np.testing.assert_array_equal(keep_large_enough(boxes, (2.0, 2.0), params), [False, True])
    # anisotropic: 5 voxels of the finest axis (5 * 0.5 mm) along it; along the coarser 1 mm axis an
    # object may be any width (0.1 asked for 2.5 mm there too and dropped the last box)
    np.testing.assert_array_equal(keep_large_enough(_boxes_from_extents([(4, 5), (3, 5), (2, 5), (2, 4)]),
                                                    (1.0, 0.5), params), [True, True, True, False])


def test_keep_large_enough_anisotropic_3d():
    params = CropParams(patch_size=(32, 64, 64))
    spacing = (3.0, 1.0, 1.0)  # in-plane threshold 5 mm; a single 3 mm slice is a possible object
    boxes = _boxes_from_extents([(3, 10, 10), (2, 10, 10), (1, 10, 10), (3, 4, 10), (3, 10, 5)])
    np.testing.assert_array_equal(keep_large_enough(boxes, spacing, params),
                                  [True, True, True, False, True])


def test_keep_large_enough_ignores_inactive_axes():
    params = CropParams(patch_size=(1, 64, 64))
    boxes = _boxes_from_extents([(1, 5, 5), (1, 4, 5), (1, 5, 4), (1, 50, 50)])
    np.testing.assert_array_equal(keep_large_enough(boxes, (3.0, 1.0, 1.0), params),
                                  [True, False, False, True])
    # a huge inactive spacing neither drops nor changes the threshold
    np.testing.assert_array_equal(keep_large_enough(boxes, (0.1, 1.0, 1.0), params),
                                  [True, False, False, True])


def test_keep_large_enough_edge_cases():
    params = CropParams(patch_size=(64, 64))
    assert keep_large_enough(np.zeros((0, 2, 2), np.int64), (1.0, 1.0), params).shape == (0,)
    boxes = _boxes_from_extents([(1, 1)])
    assert keep_large_enough(boxes, (1.0, 1.0), CropParams(patch_size=(64, 64), min_object_size=0)).all()
    assert not keep_large_enough(_boxes_from_extents([(6, 6)]), (1.0, 1.0),
                                 CropParams(patch_size=(64, 64), min_object_size=6.5)).any()


@PROPERTY
@given(data=st.data())
def test_keep_large_enough_matches_rule(data):
    nd = data.draw(st.integers(2, 3))
    active = data.draw(st.lists(st.booleans(), min_size=nd, max_size=nd).filter(any))
    params = CropParams(patch_size=tuple(16 if a else 1 for a in active),
                        min_object_size=data.draw(st.floats(0, 10)))
    spacing = data.draw(st.lists(st.floats(0.1, 5.0), min_size=nd, max_size=nd))
    extents = data.draw(st.lists(st.lists(st.integers(1, 20), min_size=nd, max_size=nd), min_size=1, max_size=8))
    boxes = _boxes_from_extents(extents, start=data.draw(st.integers(0, 5)))
    keep = keep_large_enough(boxes, spacing, params)
    finest = min(s for s, a in zip(spacing, active) if a)
    for k, ext in zip(keep, extents):
        # the rule along the finest active axes only (within 1 %); coarser axes ask for nothing
        expected = all(e * s >= params.min_object_size * finest - 1e-6
                       for e, s, a in zip(ext, spacing, active) if a and s <= finest * 1.01)
        assert bool(k) == expected


# ----------------------------------------------------------------------------------------------
# square_and_pad
# ----------------------------------------------------------------------------------------------

def test_square_and_pad_hand_computed():
    params = CropParams(patch_size=(64, 64), margin_fraction=0.125, margin_min=4.0)
    # 10 x 10 voxels at (1, 0.5) mm = 10 x 5 mm -> square 10 mm, margin max(1.25, 4 * 0.5) = 2 mm
    centre, size = square_and_pad(np.array([[[0, 10], [20, 30]]]), (1.0, 0.5), params)
    np.testing.assert_allclose(centre, [[5.0, 25.0]])
    np.testing.assert_allclose(size, [[14.0, 28.0]])
    # large box: the fractional margin wins: 100 + 2 * 12.5
    centre, size = square_and_pad(np.array([[[0, 100], [0, 40]]]), (1.0, 1.0), params)
    np.testing.assert_allclose(size, [[125.0, 125.0]])
    np.testing.assert_allclose(centre, [[50.0, 20.0]])


def test_square_and_pad_margin_floor_for_tiny_boxes():
    params = CropParams(patch_size=(64, 64), margin_fraction=0.125, margin_min=4.0)
    _, size = square_and_pad(np.array([[[3, 4], [7, 8]]]), (1.0, 1.0), params)
    np.testing.assert_allclose(size, [[9.0, 9.0]])
    _, size = square_and_pad(np.array([[[3, 4], [7, 8]]]), (2.0, 2.0), params)
    np.testing.assert_allclose(size, [[9.0, 9.0]])  # 2 mm + 2 * 8 mm = 18 mm = 9 voxels


def test_square_and_pad_inactive_axis_untouched():
    params = CropParams(patch_size=(1, 64, 64))
    centre, size = square_and_pad(np.array([[[4, 5], [10, 20], [0, 6]]]), (5.0, 1.0, 1.0), params)
    np.testing.assert_allclose(centre[:, 0], [4.5])
    np.testing.assert_allclose(size[:, 0], [1.0])
    np.testing.assert_allclose(size[:, 1:], [[18.0, 18.0]])


def test_square_and_pad_no_square():
    params = CropParams(patch_size=(64, 64), margin_fraction=0.0, margin_min=1.0, square=False)
    centre, size = square_and_pad(np.array([[[0, 10], [0, 4]]]), (1.0, 1.0), params)
    np.testing.assert_allclose(size, [[12.0, 6.0]])


def test_square_and_pad_empty():
    centre, size = square_and_pad(np.zeros((0, 3, 2), np.int64), (1.0, 1.0, 1.0), CropParams(patch_size=(8, 8, 8)))
    assert centre.shape == (0, 3) and size.shape == (0, 3)


@PROPERTY
@given(data=st.data())
def test_square_and_pad_properties(data):
    nd = data.draw(st.integers(2, 3))
    active = np.array(data.draw(st.lists(st.booleans(), min_size=nd, max_size=nd).filter(any)))
    square = data.draw(st.booleans())
    params = CropParams(patch_size=tuple(32 if a else 1 for a in active),
                        margin_fraction=data.draw(st.floats(0, 0.5)), margin_min=data.draw(st.floats(0, 8)),
                        square=square)
    spacing = np.array(data.draw(st.lists(st.floats(0.2, 5.0), min_size=nd, max_size=nd)))
    n = data.draw(st.integers(1, 6))
    starts = np.array(data.draw(st.lists(st.lists(st.integers(-5, 50), min_size=nd, max_size=nd),
                                         min_size=n, max_size=n)))
    ext = np.array(data.draw(st.lists(st.lists(st.integers(1, 40), min_size=nd, max_size=nd),
                                      min_size=n, max_size=n)))
    boxes = np.stack([starts, starts + ext], axis=-1)
    centre, size = square_and_pad(boxes, spacing, params)
    assert centre.shape == size.shape == (n, nd)
    np.testing.assert_allclose(centre, (boxes[:, :, 0] + boxes[:, :, 1]) / 2.0)
    # inactive axes keep their own extent
    np.testing.assert_allclose(size[:, ~active], ext[:, ~active])
    ext_mm = ext * spacing[None]
    size_mm = size * spacing[None]
    finest = spacing[active].min()
    side_mm = ext_mm[:, active].max(axis=1)
    margin_mm = np.maximum(params.margin_fraction * side_mm, params.margin_min * finest)
    for i in range(n):
        act_mm = size_mm[i, active]
        # never smaller than the object plus the margin on both sides
        assert np.all(act_mm >= ext_mm[i, active] + 2 * margin_mm[i] - 1e-9)
        assert np.all(act_mm >= ext_mm[i, active] + 2 * params.margin_min * finest - 1e-9)
        if square:
            # squared in millimetres: equal on every active axis, = longest side + 2 margins
            np.testing.assert_allclose(act_mm, act_mm[0], rtol=1e-9)
            np.testing.assert_allclose(act_mm[0], side_mm[i] + 2 * margin_mm[i], rtol=1e-9)
        else:
            np.testing.assert_allclose(act_mm, ext_mm[i, active] + 2 * margin_mm[i], rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# jitter
# ----------------------------------------------------------------------------------------------

def test_jitter_hand_computed_amplitude_and_zero():
    params = CropParams(patch_size=(64, 64), jitter_image_fraction=0.0, jitter_box_fraction=0.25)
    centre, size = np.array([[10.0, 10.0]]), np.array([[20.0, 20.0]])
    c, s = jitter(centre, size, (100, 100), params, np.random.default_rng(0))
    np.testing.assert_array_equal(c, centre)
    np.testing.assert_array_equal(s, size)


def test_jitter_reaches_both_ends_of_amplitude():
    params = CropParams(patch_size=(1, 64, 64), jitter_image_fraction=1 / 16, jitter_box_fraction=0.25)
    n = 400
    centre = np.tile([[3.0, 50.0, 50.0]], (n, 1))
    size = np.tile([[1.0, 40.0, 12.0]], (n, 1))
    c, s = jitter(centre, size, (7, 128, 256), params, np.random.default_rng(1))
    # axis 1: min(128 / 16, 0.25 * 40) = 8; axis 2: min(256 / 16, 0.25 * 12) = 3
    dc, ds = c - centre, s - size
    assert dc[:, 1].min() == -8 and dc[:, 1].max() == 8
    assert dc[:, 2].min() == -3 and dc[:, 2].max() == 3
    assert ds[:, 1].min() == -8 and ds[:, 1].max() == 8
    assert ds[:, 2].min() == -3 and ds[:, 2].max() == 3
    assert np.all(dc[:, 0] == 0) and np.all(ds[:, 0] == 0)


def test_jitter_keeps_sizes_at_least_one_voxel():
    params = CropParams(patch_size=(64, 64), jitter_image_fraction=1.0, jitter_box_fraction=1.0)
    n = 300
    size = np.tile([[2.0, 3.0]], (n, 1))  # amplitude 2 and 3 voxels: size + delta can reach 0
    c, s = jitter(np.full((n, 2), 20.0), size, (64, 64), params, np.random.default_rng(3))
    assert s.min() == 1.0
    assert np.all(s >= 1.0)
    assert s[:, 0].max() == 4.0 and s[:, 1].max() == 6.0


@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_jitter_properties(data, seed):
    nd = data.draw(st.integers(2, 3))
    active = np.array(data.draw(st.lists(st.booleans(), min_size=nd, max_size=nd).filter(any)))
    params = CropParams(patch_size=tuple(32 if a else 1 for a in active),
                        jitter_image_fraction=data.draw(st.floats(0, 0.3)),
                        jitter_box_fraction=data.draw(st.floats(0, 1.5)))
    image_shape = np.array(data.draw(st.lists(st.integers(1, 300), min_size=nd, max_size=nd)))
    n = data.draw(st.integers(1, 8))
    centre = np.array(data.draw(st.lists(st.lists(st.floats(-10, 300), min_size=nd, max_size=nd),
                                         min_size=n, max_size=n)))
    size = np.array(data.draw(st.lists(st.lists(st.floats(1, 200), min_size=nd, max_size=nd),
                                       min_size=n, max_size=n)))
    c, s = jitter(centre, size, image_shape, params, np.random.default_rng(seed))
    assert c.shape == s.shape == (n, nd)
    amp = np.floor(np.minimum(params.jitter_image_fraction * image_shape[None],
                              params.jitter_box_fraction * size))
    dc = c - centre
    np.testing.assert_allclose(dc, np.rint(dc), atol=1e-9)  # whole voxels
    assert np.all(np.abs(dc) <= amp + 1e-9)
    assert np.all(s >= 1.0)
    ds = s - size
    # size delta is an integer within the amplitude, unless clamped to 1 voxel
    clamped = s == 1.0
    np.testing.assert_allclose(ds[~clamped], np.rint(ds[~clamped]), atol=1e-9)
    assert np.all(np.abs(ds[~clamped]) <= amp[~clamped] + 1e-9)
    assert np.all(size[clamped] - amp[clamped] <= 1.0 + 1e-9)
    # inactive axes never move
    np.testing.assert_array_equal(c[:, ~active], centre[:, ~active])
    np.testing.assert_array_equal(s[:, ~active], size[:, ~active])
    # deterministic for a seed
    c2, s2 = jitter(centre, size, image_shape, params, np.random.default_rng(seed))
    np.testing.assert_array_equal(c, c2)
    np.testing.assert_array_equal(s, s2)


# ----------------------------------------------------------------------------------------------
# fit_to_image
# ----------------------------------------------------------------------------------------------

def test_fit_to_image_hand_computed():
    out = fit_to_image(np.array([[5.0, 50.0], [-3.0, 98.0], [10.0, 10.0]]),
                       np.array([[6.0, 20.0], [4.0, 10.0], [500.0, 30.0]]), (20, 100))
    np.testing.assert_array_equal(out, [[[2, 8], [40, 60]],
                                        [[0, 4], [90, 100]],   # shifted, size kept
                                        [[0, 20], [0, 30]]])   # clamped to the whole axis


def test_fit_to_image_empty():
    out = fit_to_image(np.zeros((0, 3)), np.zeros((0, 3)), (4, 5, 6))
    assert out.shape == (0, 3, 2)


@PROPERTY
@given(data=st.data())
def test_fit_to_image_properties(data):
    nd = data.draw(st.integers(2, 3))
    shape = np.array(data.draw(st.lists(st.integers(1, 80), min_size=nd, max_size=nd)))
    n = data.draw(st.integers(1, 10))
    centre = np.array(data.draw(st.lists(st.lists(st.floats(-100, 200), min_size=nd, max_size=nd),
                                         min_size=n, max_size=n)))
    size = np.array(data.draw(st.lists(st.lists(st.floats(0.1, 200), min_size=nd, max_size=nd),
                                       min_size=n, max_size=n)))
    out = fit_to_image(centre, size, tuple(shape))
    assert out.shape == (n, nd, 2)  # never drops a box
    assert np.issubdtype(out.dtype, np.integer)
    start, stop = out[..., 0], out[..., 1]
    assert np.all(start >= 0)
    assert np.all(start < stop)
    assert np.all(stop <= shape[None])
    requested = np.maximum(np.rint(size), 1)
    fits = requested <= shape[None]
    np.testing.assert_array_equal((stop - start)[fits], requested[fits])
    np.testing.assert_array_equal(start[~fits], 0)
    np.testing.assert_array_equal(stop[~fits], np.broadcast_to(shape[None], stop.shape)[~fits])
    # the box contains its centre whenever the centre is inside the image
    inside = (centre >= 0) & (centre <= shape[None])
    assert np.all(start[inside] <= centre[inside] + 1e-9)
    assert np.all(stop[inside] >= centre[inside] - 1e-9)


@PROPERTY
@given(data=st.data())
def test_fit_to_image_keeps_boxes_already_inside(data):
    nd = data.draw(st.integers(2, 3))
    shape = data.draw(st.lists(st.integers(1, 60), min_size=nd, max_size=nd))
    n = data.draw(st.integers(1, 6))
    boxes = []
    for _ in range(n):
        box = []
        for length in shape:
            w = data.draw(st.integers(1, length))
            a = data.draw(st.integers(0, length - w))
            box.append([a, a + w])
        boxes.append(box)
    boxes = np.array(boxes, dtype=np.int64)
    centre = boxes.mean(axis=2)
    size = (boxes[:, :, 1] - boxes[:, :, 0]).astype(float)
    np.testing.assert_array_equal(fit_to_image(centre, size, shape), boxes)


# ----------------------------------------------------------------------------------------------
# boxes_from_mask / whole_image_boxes
# ----------------------------------------------------------------------------------------------

def test_boxes_from_mask_hand_built_2d():
    mask = np.zeros((1, 64, 64), dtype=np.uint8)
    mask[0, 10:20, 30:34] = 1   # 10 x 4: dropped
    mask[0, 40:50, 40:50] = 1   # 10 x 10: kept -> 10 + 2 * max(1.25, 4) = 18, centred at 45
    params = CropParams(patch_size=(1, 32, 32))
    boxes, n_dropped = boxes_from_mask(mask, (3.0, 1.0, 1.0), params)
    assert n_dropped == 1
    np.testing.assert_array_equal(boxes, [[[0, 1], [36, 54], [36, 54]]])


def test_boxes_from_mask_empty_and_all_dropped():
    params = CropParams(patch_size=(16, 16, 16))
    boxes, n_dropped = boxes_from_mask(np.zeros((5, 6, 7), bool), (1, 1, 1), params)
    assert boxes.shape == (0, 3, 2) and n_dropped == 0
    mask = np.zeros((5, 6, 7), bool)
    mask[1, 1, 1] = mask[3, 4, 5] = True
    boxes, n_dropped = boxes_from_mask(mask, (1, 1, 1), params, rng=np.random.default_rng(0))
    assert boxes.shape == (0, 3, 2) and n_dropped == 2


def test_boxes_from_mask_object_larger_than_image_is_kept():
    mask = np.ones((1, 20, 30), dtype=bool)
    boxes, n_dropped = boxes_from_mask(mask, (1, 1, 1), CropParams(patch_size=(1, 16, 16)))
    assert n_dropped == 0
    np.testing.assert_array_equal(boxes, [[[0, 1], [0, 20], [0, 30]]])


@st.composite
def mask_cases(draw):
    kind = draw(st.sampled_from(["2d_on_3d", "3d", "3d_aniso"]))
    if kind == "2d_on_3d":
        shape = (1, draw(st.integers(8, 64)), draw(st.integers(8, 64)))
        patch = (1, 32, 32)
        spacing = (draw(st.floats(0.5, 6.0)), draw(st.floats(0.3, 2.0)), draw(st.floats(0.3, 2.0)))
    elif kind == "3d":
        shape = (draw(st.integers(4, 16)), draw(st.integers(8, 40)), draw(st.integers(8, 40)))
        patch = (16, 32, 32)
        spacing = tuple(draw(st.floats(0.3, 4.0)) for _ in range(3))
    else:
        shape = draw(st.sampled_from([(7, 40, 23), (5, 33, 48), (12, 17, 31)]))
        patch = draw(st.sampled_from([(1, 32, 32), (8, 32, 32)]))
        spacing = draw(st.sampled_from([(3.0, 1.0, 1.0), (5.0, 0.7, 0.7), (1.0, 1.0, 1.0), (2.5, 0.8, 1.2)]))
    params = CropParams(patch_size=patch, margin_fraction=draw(st.sampled_from([0.0, 0.125, 0.3])),
                        margin_min=draw(st.sampled_from([0.0, 1.0, 4.0])),
                        min_object_size=draw(st.sampled_from([0.0, 3.0, 5.0])),
                        square=draw(st.booleans()))
    mask = random_mask(shape, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.002, 0.01, 0.04])),
                       draw(st.integers(0, 4)), params.active)
    return mask, spacing, params


@PROPERTY
@given(case=mask_cases())
def test_boxes_from_mask_properties(case):
    mask, spacing, params = case
    shape = np.array(mask.shape)
    active = params.active
    boxes, n_dropped = boxes_from_mask(mask, spacing, params)
    ref = ref_components(mask, active)
    finest = min(s for s, a in zip(spacing, active) if a)
    threshold = params.min_object_size * finest

    ruled = active & (np.asarray(spacing) <= finest * 1.01)  # the finest active axes carry the rule

    def large_enough(box):
        ext = (box[:, 1] - box[:, 0]) * np.asarray(spacing)
        return bool(np.all(ext[ruled] >= threshold - 1e-6))

    kept = [(b, c) for b, c in ref if large_enough(b)]
    assert n_dropped == len(ref) - len(kept)
    assert boxes.shape == (len(kept), mask.ndim, 2)
    # every box inside the image
    assert np.all(boxes[..., 0] >= 0) and np.all(boxes[..., 0] < boxes[..., 1])
    assert np.all(boxes[..., 1] <= shape[None])
    # inactive axes: one index thick
    assert np.all(boxes[:, ~active, 1] - boxes[:, ~active, 0] == 1)
    # every kept component lies entirely inside at least one box
    for box, coords in kept:
        inside = np.all((boxes[:, :, 0] <= box[None, :, 0]) & (boxes[:, :, 1] >= box[None, :, 1]), axis=1)
        assert inside.any(), f"component {box.tolist()} not covered by any of {boxes.tolist()}"
    covered = np.zeros(mask.shape, bool)
    for b in boxes:
        covered[box_slices(b)] = True
    for _, coords in kept:
        assert covered[tuple(coords.T)].all()


@PROPERTY
@given(case=mask_cases(), seed=st.integers(0, 2**32 - 1))
def test_boxes_from_mask_with_jitter(case, seed):
    mask, spacing, params = case
    shape = np.array(mask.shape)
    plain, n_plain = boxes_from_mask(mask, spacing, params)
    boxes, n_dropped = boxes_from_mask(mask, spacing, params, rng=np.random.default_rng(seed))
    assert n_dropped == n_plain and boxes.shape == plain.shape
    assert np.all(boxes[..., 0] >= 0) and np.all(boxes[..., 0] < boxes[..., 1])
    assert np.all(boxes[..., 1] <= shape[None])
    inactive = ~params.active
    np.testing.assert_array_equal(boxes[:, inactive], plain[:, inactive])
    again, _ = boxes_from_mask(mask, spacing, params, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(boxes, again)


@PROPERTY
@given(case=mask_cases(), seed=st.integers(0, 2**32 - 1))
def test_jittered_boxes_keep_object_centre(case, seed):
    """With the default box fraction (0.25) the jitter can cut into an object but never moves
    the crop off it: the centre of every kept object stays inside its jittered box."""
    mask, spacing, params = case
    params = dataclasses.replace(params, jitter_image_fraction=0.5, jitter_box_fraction=0.25)
    boxes, _ = boxes_from_mask(mask, spacing, params, rng=np.random.default_rng(seed))
    _, comp = component_boxes(mask, params.active)
    comp = comp[keep_large_enough(comp, spacing, params)]
    assert len(comp) == len(boxes)
    centre = comp.mean(axis=2)
    assert np.all(boxes[..., 0] <= centre) and np.all(centre <= boxes[..., 1])


def test_boxes_from_mask_accepts_torch():
    mask = np.zeros((6, 30, 30), dtype=np.uint8)
    mask[2:5, 5:15, 8:20] = 1  # 3 slices at 2 mm = 6 mm >= 5 mm: kept
    params = CropParams(patch_size=(4, 32, 32))
    b_np, n_np = boxes_from_mask(mask, (2.0, 1.0, 1.0), params)
    b_t, n_t = boxes_from_mask(torch.from_numpy(mask), (2.0, 1.0, 1.0), params)
    np.testing.assert_array_equal(b_np, b_t)
    assert n_np == n_t == 0 and len(b_np) == 1


@pytest.mark.parametrize("shape, active", [((4, 5, 6), (True, True, True)), ((4, 5, 6), (False, True, True)),
                                           ((7, 9), (True, True)), ((7, 9), (True, False)),
                                           ((3, 4, 5), (True, False, True))])
def test_whole_image_boxes_tile_the_image_exactly(shape, active):
    boxes = whole_image_boxes(shape, active)
    active = np.asarray(active)
    n_expected = int(np.prod([s for s, a in zip(shape, active) if not a]))
    assert boxes.shape == (n_expected, len(shape), 2) and boxes.dtype == np.int64
    count = np.zeros(shape, int)
    for b in boxes:
        count[box_slices(b)] += 1
    np.testing.assert_array_equal(count, 1)
    np.testing.assert_array_equal(boxes[:, active, 0], 0)
    np.testing.assert_array_equal(boxes[:, active, 1], np.broadcast_to(np.array(shape)[active], (n_expected, active.sum())))
    assert np.all(boxes[:, ~active, 1] - boxes[:, ~active, 0] == 1)


# ----------------------------------------------------------------------------------------------
# crop_and_resample / resample_crop_to_box
# ----------------------------------------------------------------------------------------------

@PROPERTY
@given(case=geometry_cases(max_extent=48), data=st.data())
def test_crop_identity_when_box_matches_output(case, data):
    shape, _ = case
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    img = rng.standard_normal((2, *shape)).astype(np.float32)
    size = [data.draw(st.integers(1, s)) for s in shape]
    boxes = []
    for _ in range(data.draw(st.integers(1, 4))):
        starts = [data.draw(st.integers(0, s - w)) for s, w in zip(shape, size)]
        boxes.append([[a, a + w] for a, w in zip(starts, size)])
    boxes = np.array(boxes)
    out = crop_and_resample(img, boxes, size, mode="nearest")
    assert out.shape == (len(boxes), 2, *size)
    for i, b in enumerate(boxes):
        ref = img[(slice(None), *box_slices(b))]
        np.testing.assert_array_equal(out[i], ref)  # bit-exact
    # linear interpolation lands on the voxel centres only up to float32 rounding of the
    # normalised grid coordinates (errors ~1e-5 of the neighbour difference), so not bit-exact
    out_lin = crop_and_resample(img, boxes, size, mode="linear")
    for i, b in enumerate(boxes):
        np.testing.assert_allclose(out_lin[i], img[(slice(None), *box_slices(b))], rtol=0, atol=2e-4)


def test_crop_identity_linear_constant_image_is_exact():
    img = np.full((1, 13, 17), 3.25, dtype=np.float32)
    out = crop_and_resample(img, np.array([[[2, 10], [3, 16]]]), (8, 13), mode="linear")
    np.testing.assert_array_equal(out, 3.25)


def test_crop_types_devices_and_shapes():
    img = np.random.default_rng(0).random((3, 10, 12, 14)).astype(np.float64)
    boxes = np.array([[[0, 10], [0, 12], [0, 14]], [[2, 5], [1, 9], [3, 4]]])
    out = crop_and_resample(img, boxes, (4, 5, 6))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3, 4, 5, 6)
    for device in DEVICES:
        t = torch.as_tensor(img, device=device)
        out_t = crop_and_resample(t, boxes, (4, 5, 6))
        assert isinstance(out_t, torch.Tensor) and out_t.device.type == device
        assert out_t.dtype == torch.float32 and out_t.shape == (2, 3, 4, 5, 6)
        np.testing.assert_allclose(out_t.cpu().numpy(), out, atol=1e-5)
    # integer label images are accepted (cast to float)
    lab = np.random.default_rng(1).integers(0, 3, (1, 9, 9))
    out = crop_and_resample(lab, np.array([[[0, 9], [0, 9]]]), (9, 9), mode="nearest")
    np.testing.assert_array_equal(out[0], lab)


def test_crop_zero_boxes():
    img = np.zeros((2, 8, 9), np.float32)
    out = crop_and_resample(img, np.zeros((0, 2, 2)), (4, 5))
    assert isinstance(out, np.ndarray) and out.shape == (0, 2, 4, 5) and out.dtype == np.float32
    for device in DEVICES:
        out_t = crop_and_resample(torch.zeros(2, 8, 9, 7, device=device), np.zeros((0, 3, 2)), (4, 5, 6))
        assert isinstance(out_t, torch.Tensor) and out_t.shape == (0, 2, 4, 5, 6)
        assert out_t.device.type == device


def test_crop_out_size_mismatch_raises():
    with pytest.raises(ValueError):
        crop_and_resample(np.zeros((1, 8, 8), np.float32), np.array([[[0, 8], [0, 8]]]), (4, 4, 4))


def test_crop_linear_downsample_by_two_is_average_pooling():
    img = np.random.default_rng(0).standard_normal((2, 16, 24)).astype(np.float32)
    out = crop_and_resample(img, np.array([[[0, 16], [0, 24]]]), (8, 12), mode="linear")
    ref = F.avg_pool2d(torch.from_numpy(img)[None], 2)[0].numpy()
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    img3 = np.random.default_rng(1).standard_normal((1, 8, 6, 10)).astype(np.float32)
    out = crop_and_resample(img3, np.array([[[0, 8], [0, 6], [0, 10]]]), (4, 3, 5), mode="linear")
    ref = F.avg_pool3d(torch.from_numpy(img3)[None], 2)[0].numpy()
    np.testing.assert_allclose(out[0], ref, atol=1e-5)


def test_crop_nearest_upsample_by_two_repeats_voxels():
    img = np.random.default_rng(0).standard_normal((2, 16, 24)).astype(np.float32)
    out = crop_and_resample(img, np.array([[[3, 9], [2, 10]]]), (12, 16), mode="nearest")
    np.testing.assert_array_equal(out[0], img[:, 3:9, 2:10].repeat(2, axis=1).repeat(2, axis=2))
    # inactive first axis: one slice, in-plane upsampling
    vol = np.random.default_rng(1).standard_normal((1, 5, 8, 8)).astype(np.float32)
    out = crop_and_resample(vol, np.array([[[2, 3], [1, 5], [4, 8]]]), (1, 8, 8), mode="nearest")
    np.testing.assert_array_equal(out[0], vol[:, 2:3, 1:5, 4:8].repeat(2, axis=2).repeat(2, axis=3))


@PROPERTY
@given(data=st.data())
def test_crop_linear_reproduces_affine_functions(data):
    nd = data.draw(st.integers(2, 3))
    shape = [data.draw(st.integers(4, 24)) for _ in range(nd)]
    coef = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=nd, max_size=nd)))
    offset = data.draw(st.floats(-5, 5))
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    img = (offset + sum(c * g for c, g in zip(coef, grids))).astype(np.float32)[None]
    out_size = [data.draw(st.integers(1, 12)) for _ in range(nd)]
    boxes = []
    for _ in range(data.draw(st.integers(1, 3))):
        box = []
        for s in shape:
            a = data.draw(st.floats(0.0, s - 1.5))
            b = data.draw(st.floats(a + 0.5, s))
            box.append([a, b])
        boxes.append(box)
    boxes = np.array(boxes)
    out = crop_and_resample(img, boxes, out_size, mode="linear", padding_mode="zeros")
    for i, box in enumerate(boxes):
        src = [box[d, 0] + (np.arange(out_size[d]) + 0.5) * (box[d, 1] - box[d, 0]) / out_size[d] - 0.5
               for d in range(nd)]
        sg = np.meshgrid(*src, indexing="ij")
        expected = offset + sum(c * g for c, g in zip(coef, sg))
        valid = np.all([(g >= 0) & (g <= s - 1) for g, s in zip(sg, shape)], axis=0)
        np.testing.assert_allclose(out[i, 0][valid], expected[valid], atol=2e-3, rtol=1e-4)


@PROPERTY
@given(data=st.data(), mode=st.sampled_from(["nearest", "linear"]))
def test_crop_batched_equals_one_by_one(data, mode):
    nd = data.draw(st.integers(2, 3))
    shape = [data.draw(st.integers(3, 20)) for _ in range(nd)]
    img = np.random.default_rng(data.draw(st.integers(0, 1000))).standard_normal((2, *shape)).astype(np.float32)
    out_size = [data.draw(st.integers(1, 10)) for _ in range(nd)]
    boxes = []
    for _ in range(data.draw(st.integers(2, 5))):
        box = []
        for s in shape:
            a = data.draw(st.integers(-3, s - 1))
            box.append([a, data.draw(st.integers(a + 1, s + 3))])
        boxes.append(box)
    boxes = np.array(boxes)
    batched = crop_and_resample(img, boxes, out_size, mode=mode)
    for i, b in enumerate(boxes):
        single = crop_and_resample(img, b[None], out_size, mode=mode)
        np.testing.assert_array_equal(batched[i], single[0])


@PROPERTY
@given(data=st.data())
def test_crop_outside_image_padding_modes(data):
    shape = [data.draw(st.integers(2, 12)) for _ in range(2)]
    img = np.random.default_rng(data.draw(st.integers(0, 1000))).standard_normal((1, *shape)).astype(np.float32) + 10
    box = []
    for s in shape:
        a = data.draw(st.integers(-6, s + 2))
        box.append([a, a + data.draw(st.integers(1, 8))])
    box = np.array(box)
    size = box[:, 1] - box[:, 0]
    idx = [np.arange(a, b) for a, b in box]
    border = crop_and_resample(img, box[None], size, mode="nearest", padding_mode="border")[0, 0]
    clipped = np.ix_(*[np.clip(i, 0, s - 1) for i, s in zip(idx, shape)])
    np.testing.assert_array_equal(border, img[0][clipped])
    zeros = crop_and_resample(img, box[None], size, mode="nearest", padding_mode="zeros")[0, 0]
    inside = np.logical_and.outer(*[(i >= 0) & (i < s) for i, s in zip(idx, shape)])
    np.testing.assert_array_equal(zeros[~inside], 0)
    np.testing.assert_array_equal(zeros[inside], border[inside])


def test_resample_crop_to_box_inverse_of_nearest_upsampling():
    crop = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    back = resample_crop_to_box(crop, np.array([[10, 14], [3, 7]]), mode="nearest")
    np.testing.assert_array_equal(back.numpy(), torch.arange(16.0).reshape(1, 4, 4).numpy())
    assert back.shape == (1, 4, 4)
    crop3 = torch.rand(2, 1, 6, 6)
    back = resample_crop_to_box(crop3, np.array([[4, 5], [0, 6], [2, 8]]), mode="linear")
    assert back.shape == (2, 1, 6, 6)
    np.testing.assert_allclose(back.numpy(), crop3.numpy(), atol=1e-5)


@pytest.mark.parametrize("crop_shape,box", [((2, 1, 16, 16), [[3, 4], [10, 47], [5, 22]]),  # 2D stage: up, down
                                            ((2, 6, 8, 8), [[0, 13], [2, 5], [4, 23]]),     # 3D
                                            ((3, 16, 16), [[7, 60], [1, 9]])])               # (K, Y, X)
def test_whole_box_pasting_is_the_exact_inverse_map(crop_shape, box):
    """Pasting onto a whole integer box (F.interpolate) gives the values of the inverse map on
    any part of it (grid_sample with the box's coordinates): the two paths are one map."""
    crop = torch.rand(crop_shape, generator=torch.Generator().manual_seed(0))
    box = np.array(box)
    whole = resample_crop_to_box(crop, box, "linear")
    assert whole.shape == (crop_shape[0], *(box[:, 1] - box[:, 0]))
    part = box.copy()
    part[:, 0] += (box[:, 1] - box[:, 0]) // 3  # a region inside the box: the sampling-grid path
    sub = resample_crop_to_box(crop, box, "linear", part)
    offset = part[:, 0] - box[:, 0]
    np.testing.assert_allclose(whole[(slice(None), *(slice(o, None) for o in offset))].numpy(), sub.numpy(),
                               atol=1e-5)

# ----------------------------------------------------------------------------------------------
# crop -> fuse round trip (the key property)
# ----------------------------------------------------------------------------------------------

@PROPERTY
@given(case=geometry_cases(max_extent=40, max_patch=20), data=st.data(),
       n_classes=st.sampled_from([2, 3]))
def test_round_trip_nearest_is_identity_for_boxes_within_patch(case, data, n_classes):
    shape, patch = case
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    labels = (rng.random(shape) < data.draw(st.sampled_from([0.1, 0.5]))).astype(np.int64)
    if n_classes == 3:
        labels *= rng.integers(1, 3, shape)
    boxes = data.draw(boxes_within_patch(shape, patch))
    oh = one_hot(labels, n_classes)
    crops = crop_and_resample(oh, boxes, patch, mode="nearest")
    assert crops.shape == (len(boxes), n_classes, *patch)
    fused, covered = fuse_crops(crops, boxes, shape, mode="nearest")
    assert fused.shape == (n_classes, *shape) and covered.shape == tuple(shape)
    expected_cov = np.zeros(shape, bool)
    for b in boxes:
        expected_cov[box_slices(b)] = True
    np.testing.assert_array_equal(covered, expected_cov)
    # covered voxels: probabilities exactly reproduced, argmax = original labels
    np.testing.assert_array_equal(fused[:, covered], oh[:, covered])
    pred = fused.argmax(0)
    np.testing.assert_array_equal(pred[covered], labels[covered])
    # uncovered voxels: background
    assert np.all(pred[~covered] == 0)
    np.testing.assert_array_equal(fused[0][~covered], 1.0)
    np.testing.assert_array_equal(fused[1:][:, ~covered], 0.0)
    # sigmoid / region mode: channels are reproduced, 0 outside
    fused_ml, covered_ml = fuse_crops(crops[:, 1:], boxes, shape, multilabel=True, mode="nearest")
    np.testing.assert_array_equal(covered_ml, expected_cov)
    np.testing.assert_array_equal(fused_ml[:, covered], oh[1:, covered])
    np.testing.assert_array_equal(fused_ml[:, ~covered], 0.0)


@PROPERTY_FEW
@given(data=st.data())
def test_round_trip_torch_matches_numpy(data):
    shape, patch = data.draw(geometry_cases(max_extent=32, max_patch=16))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    labels = (rng.random(shape) < 0.3).astype(np.int64)
    boxes = data.draw(boxes_within_patch(shape, patch))
    oh = one_hot(labels, 2)
    for device in DEVICES:
        t = torch.as_tensor(oh, device=device)
        crops = crop_and_resample(t, boxes, patch, mode="nearest")
        assert isinstance(crops, torch.Tensor) and crops.device.type == device
        fused, covered = fuse_crops(crops, boxes, shape, mode="nearest")
        assert isinstance(fused, torch.Tensor) and fused.device.type == device
        assert covered.dtype == torch.bool and covered.device.type == device
        pred = fused.argmax(0).cpu().numpy()
        cov = covered.cpu().numpy()
        np.testing.assert_array_equal(pred[cov], labels[cov])
        assert np.all(pred[~cov] == 0)


def _disc(shape, centre, radius):
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


@PROPERTY
@given(data=st.data())
def test_round_trip_linear_downsampling_keeps_smooth_blob(data):
    s = data.draw(st.integers(16, 32))
    r = data.draw(st.integers(8, min(16, s - 2)))
    shape = (96, 96)
    centre = [data.draw(st.floats(r + 1.0, n - r - 2.0)) for n in shape]
    mask = _disc(shape, centre, r)
    box = []
    for c, n in zip(centre, shape):
        lo, hi = int(np.floor(c - r)), int(np.ceil(c + r)) + 1  # the disc's bounding interval
        w = data.draw(st.integers(max(s + 1, hi - lo), min(2 * s, n)))
        a = data.draw(st.integers(max(0, hi - w), min(lo, n - w)))
        box.append([a, a + w])
    box = np.array(box)
    oh = one_hot(mask.astype(np.int64), 2)
    crops = crop_and_resample(oh, box[None], (s, s), mode="linear")
    fused, covered = fuse_crops(crops, box[None], shape, mode="linear")
    pred = fused.argmax(0) == 1
    sl = box_slices(box)
    assert covered[sl].all()
    assert dice(pred[sl], mask[sl]) >= 0.9
    assert not pred[~covered].any()


@pytest.mark.parametrize("radius, box_side, patch", [(8, 24, 16), (10, 40, 24), (9, 30, 16)])
def test_round_trip_linear_downsampling_ball_3d(radius, box_side, patch):
    shape = (48, 48, 48)
    centre = (23.3, 24.0, 22.6)
    mask = _disc(shape, centre, radius)
    a = [int(round(c - box_side / 2)) for c in centre]
    box = np.array([[x, x + box_side] for x in a])
    assert mask[box_slices(box)].sum() == mask.sum()  # the ball lies inside the box
    crops = crop_and_resample(one_hot(mask.astype(np.int64), 2), box[None], (patch,) * 3, mode="linear")
    fused, covered = fuse_crops(crops, box[None], shape, mode="linear")
    pred = fused.argmax(0) == 1
    assert dice(pred, mask) >= 0.9
    assert covered.sum() == box_side ** 3


# ----------------------------------------------------------------------------------------------
# fuse_crops
# ----------------------------------------------------------------------------------------------

def _two_overlapping_crops():
    # image (4, 6); crop A on rows 0-1, cols 0-3 says foreground 0.9; crop B on rows 0-1,
    # cols 2-5 says background 0.95. They overlap on cols 2-3.
    a = np.stack([np.full((2, 4), 0.1), np.full((2, 4), 0.9)]).astype(np.float32)
    b = np.stack([np.full((2, 4), 0.95), np.full((2, 4), 0.05)]).astype(np.float32)
    boxes = np.array([[[0, 2], [0, 4]], [[0, 2], [2, 6]]])
    return np.stack([a, b]), boxes


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_fuse_softmax_is_logical_or(mode):
    probs, boxes = _two_overlapping_crops()
    fused, covered = fuse_crops(probs, boxes, (4, 6), mode=mode)
    assert isinstance(fused, np.ndarray) and fused.shape == (2, 4, 6)
    expected_cov = np.zeros((4, 6), bool)
    expected_cov[:2] = True
    np.testing.assert_array_equal(covered, expected_cov)
    # overlap: foreground max(0.9, 0.05), background min(0.1, 0.95) -> foreground
    np.testing.assert_allclose(fused[1, :2, 2:4], 0.9, atol=1e-6)
    np.testing.assert_allclose(fused[0, :2, 2:4], 0.1, atol=1e-6)
    pred = fused.argmax(0)
    np.testing.assert_array_equal(pred[:2, :4], 1)
    np.testing.assert_array_equal(pred[:2, 4:], 0)
    # outside every crop: background probability 1, foreground 0
    np.testing.assert_array_equal(fused[0, 2:], 1.0)
    np.testing.assert_array_equal(fused[1, 2:], 0.0)
    # order does not matter
    fused_rev, covered_rev = fuse_crops(probs[::-1].copy(), boxes[::-1].copy(), (4, 6), mode=mode)
    np.testing.assert_array_equal(fused_rev, fused)
    np.testing.assert_array_equal(covered_rev, covered)


def test_fuse_multilabel_takes_channel_max_and_zero_outside():
    a = np.stack([np.full((2, 4), 0.2), np.full((2, 4), 0.7)]).astype(np.float32)
    b = np.stack([np.full((2, 4), 0.6), np.full((2, 4), 0.1)]).astype(np.float32)
    boxes = np.array([[[0, 2], [0, 4]], [[0, 2], [2, 6]]])
    fused, covered = fuse_crops(torch.from_numpy(np.stack([a, b])), boxes, (4, 6), multilabel=True)
    assert isinstance(fused, torch.Tensor)
    fused = fused.numpy()
    np.testing.assert_allclose(fused[:, :2, 2:4], np.broadcast_to(np.array([0.6, 0.7])[:, None, None], (2, 2, 2)),
                               atol=1e-6)
    np.testing.assert_allclose(fused[:, :2, :2], np.broadcast_to(np.array([0.2, 0.7])[:, None, None], (2, 2, 2)),
                               atol=1e-6)
    np.testing.assert_allclose(fused[:, :2, 4:], np.broadcast_to(np.array([0.6, 0.1])[:, None, None], (2, 2, 2)),
                               atol=1e-6)
    np.testing.assert_array_equal(fused[:, 2:], 0.0)
    assert covered[:2].all() and not covered[2:].any()


def test_fuse_resamples_crops_to_box_size():
    # a 2x2 crop pasted into a 4x6 box (nearest): each crop pixel covers a 2x3 block
    crop = np.zeros((1, 2, 2, 2), np.float32)
    crop[0, 1] = [[0.0, 1.0], [1.0, 0.0]]
    crop[0, 0] = 1 - crop[0, 1]
    fused, covered = fuse_crops(crop, np.array([[[1, 5], [2, 8]]]), (6, 10), mode="nearest")
    expected = np.zeros((6, 10))
    expected[1:3, 5:8] = 1
    expected[3:5, 2:5] = 1
    np.testing.assert_array_equal(fused[1], expected)
    assert covered.sum() == 24


def test_fuse_zero_crops():
    fused, covered = fuse_crops(np.zeros((0, 3, 4, 4), np.float32), np.zeros((0, 2, 2), np.int64), (5, 6))
    assert fused.shape == (3, 5, 6) and covered.shape == (5, 6)
    np.testing.assert_array_equal(fused[0], 1.0)
    np.testing.assert_array_equal(fused[1:], 0.0)
    assert not covered.any()
    fused, covered = fuse_crops(np.zeros((0, 2, 4, 4), np.float32), np.zeros((0, 2, 2), np.int64), (5, 6),
                                multilabel=True)
    np.testing.assert_array_equal(fused, 0.0)


# ----------------------------------------------------------------------------------------------
# probabilities_to_logits
# ----------------------------------------------------------------------------------------------

@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 5), dtype=st.sampled_from([torch.float32, torch.float64]),
       log_range=st.sampled_from([1.0, 3.0, 6.0]))
def test_probabilities_to_logits_softmax_round_trip(seed, k, dtype, log_range):
    g = torch.Generator().manual_seed(seed)
    # probabilities spread over several decades, inside (1e-6, 1 - 1e-6)
    p = 10 ** (-log_range * torch.rand(k, 5, 6, generator=g, dtype=torch.float64))
    p = p.clamp(1.001e-6, 1 - 1.001e-6).to(dtype)
    logits = probabilities_to_logits(p, multilabel=False)
    assert logits.shape == p.shape and torch.isfinite(logits).all()
    np.testing.assert_allclose(torch.softmax(logits.double(), 0).numpy(), (p / p.sum(0, keepdim=True)).double().numpy(),
                               atol=1e-5, rtol=0)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_probabilities_to_logits_sigmoid_round_trip(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(3, 7, 7, generator=g, dtype=torch.float64)
    # mix of values near 0, near 1 and in between
    p = torch.where(u < 0.3, 10 ** (-6 * u / 0.3), torch.where(u > 0.7, 1 - 10 ** (-6 * (1 - u) / 0.3), u))
    p = p.clamp(1.001e-6, 1 - 1.001e-6).to(dtype)
    logits = probabilities_to_logits(p, multilabel=True)
    assert torch.isfinite(logits).all()
    np.testing.assert_allclose(torch.sigmoid(logits.double()).numpy(), p.double().numpy(), atol=1e-5, rtol=0)


def test_probabilities_to_logits_clamps_extremes():
    p = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    for ml in (False, True):
        logits = probabilities_to_logits(p, multilabel=ml)
        assert torch.isfinite(logits).all()
    soft = torch.softmax(probabilities_to_logits(p, multilabel=False), 0)
    np.testing.assert_allclose(soft.numpy(), p.numpy(), atol=1e-5)
    sig = torch.sigmoid(probabilities_to_logits(p, multilabel=True))
    np.testing.assert_allclose(sig.numpy(), p.numpy(), atol=1e-5)


def test_probabilities_to_logits_inplace_matches_and_overwrites():
    for ml in (False, True):
        p = torch.tensor([[0.2, 0.9, 1e-9], [0.8, 0.1, 1.0]])
        expected = probabilities_to_logits(p, multilabel=ml)
        assert p[0, 0] == pytest.approx(0.2)  # the default leaves its input alone
        out = probabilities_to_logits(p, multilabel=ml, inplace=True)
        assert out.data_ptr() == p.data_ptr()
        torch.testing.assert_close(out, expected)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 4), ties=st.booleans())
def test_foreground_from_probabilities_matches_nnunet_segmentation(seed, k, ties):
    """Same foreground as nnU-Net's LabelManager: argmax > 0 (first of tied maxima wins) for
    softmax outputs, any region above 0.5 for sigmoid outputs."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k, 6, 7, generator=g)
    if ties:  # quantised values make exact ties between background and foreground channels common
        p = (p * 3).round() / 3
    if k >= 2:  # softmax outputs have background + at least one class
        softmax = LabelManager({"background": 0, **{f"c{i}": i for i in range(1, k)}}, regions_class_order=None)
        expected = softmax.convert_probabilities_to_segmentation(p.clone()) > 0
        torch.testing.assert_close(foreground_from_probabilities(p, multilabel=False), expected)
    regions = LabelManager({"background": 0, **{f"r{i}": (i, k + 1) for i in range(1, k + 1)}},
                           regions_class_order=list(range(1, k + 1)))
    expected = regions.convert_probabilities_to_segmentation(p) > 0
    torch.testing.assert_close(foreground_from_probabilities(p, multilabel=True), expected)


# ----------------------------------------------------------------------------------------------
# devices without float64 (Apple's mps): every tensor the geometry makes is float32 or integer
# ----------------------------------------------------------------------------------------------

class _NoFloat64(torch.overrides.TorchFunctionMode):
    """Fails on any torch call that returns a float64 tensor: on an mps device each would be an
    error ("MPS framework doesn't support float64")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{getattr(func, '__name__', func)} made a float64 tensor")
        return out


def test_grids_are_float32_for_devices_without_float64():
    from nnunet_stseg.core.fusion import fuse_polar_probabilities
    from nnunet_stseg.core.polar import from_polar, to_polar

    image = torch.rand(2, 3, 40, 50)
    boxes = np.array([[[1, 2], [3.5, 20.25], [10, 41]], [[0, 3], [0, 40], [0, 50]]])
    with _NoFloat64():
        crops = crop_and_resample(image, boxes, (1, 16, 16))
        back = resample_crop_to_box(crops[0], np.array([[1, 2], [4, 20], [10, 41]]))
        polar, radii = to_polar(image[:, 1], np.array([[20.5, 24.0], [3.0, 7.0]]), (32, 16), theta0=[0.3, 0.0])
        cart = from_polar(polar.softmax(1), np.array([[20.5, 24.0], [3.0, 7.0]]), (40, 50), radii, theta0=[0.3, 0.0])
        fused = fuse_polar_probabilities(cart, [[20.5, 24.0], [3.0, 7.0]], multilabel=False)
    assert crops.dtype == back.dtype == polar.dtype == cart.dtype == fused.dtype == torch.float32
    with pytest.raises(AssertionError, match="float64"), _NoFloat64():
        torch.zeros(2, dtype=torch.float64)  # the check itself works


# ----------------------------------------------------------------------------------------------
# the size rule on anisotropic data and on the coarse grid (issue 16)
# ----------------------------------------------------------------------------------------------

def test_a_lesion_on_one_thick_slice_is_kept_and_a_speck_is_dropped():
    """0.7 x 0.7 x 3 mm (nnU-Net's z, y, x = 3, 0.7, 0.7): a 10 x 10 px lesion on ONE slice is a real
    object (0.1 dropped it: 3 mm < 5 x 0.7 mm); a 2 x 2 px speck on one slice is noise."""
    params = CropParams(patch_size=(32, 32, 32))
    mask = np.zeros((8, 40, 40), bool)
    mask[3, 5:15, 5:15] = True  # the lesion
    mask[6, 30:32, 30:32] = True  # the speck
    boxes, n_dropped = boxes_from_mask(mask, [3.0, 0.7, 0.7], params)
    assert n_dropped == 1 and len(boxes) == 1 and boxes[0, 0, 0] <= 3 < boxes[0, 0, 1] and boxes[0, 1, 0] <= 5


def test_the_size_rule_is_judged_in_coarse_voxels():
    """On a coarse mask upsampled x8, one coarse voxel is 8 full-resolution voxels wide: a 1-voxel
    coarse speck must still be dropped (0.1 measured it in full-resolution voxels and kept it);
    an object of 5 coarse voxels is kept."""
    params = CropParams(patch_size=(1, 32, 32))
    mask = np.zeros((1, 128, 128), bool)
    mask[0, 0:8, 0:8] = True  # one coarse voxel, upsampled
    mask[0, 60:100, 60:100] = True  # 5 x 5 coarse voxels
    full, coarse = [1.0, 0.5, 0.5], [1.0, 4.0, 4.0]
    assert boxes_from_mask(mask, full, params)[1] == 0, "judged on the full grid, the speck passes"
    boxes, n_dropped = boxes_from_mask(mask, full, params, rule_spacing=coarse)
    assert n_dropped == 1 and len(boxes) == 1 and boxes[0, 1, 0] <= 60


# ----------------------------------------------------------------------------------------------
# recall-first proposals and negative training crops (issue 22)
# ----------------------------------------------------------------------------------------------

def test_a_faint_object_becomes_a_proposal_and_noise_below_the_floor_does_not():
    """Hand-built coarse probabilities (2D stage on a (1, 64, 64) grid): a certain object, a faint
    one (0.35, below the argmax decision), faint noise (0.2) and the certain object's halo (0.4).
    At threshold 0.3 the faint object is added as its own proposal, the noise is not, and the
    certain object keeps exactly its argmax extent (its crop does not change)."""
    prob = np.zeros((1, 64, 64), np.float32)
    prob[0, 8:20, 8:20] = 0.4            # halo
    prob[0, 10:18, 10:18] = 0.9          # certain object (argmax)
    prob[0, 40:50, 30:42] = 0.35         # faint object
    prob[0, 5:9, 50:60] = 0.2            # noise below the floor
    fg = prob > 0.5
    mask, n_extra = recall_proposals(fg, prob, 0.3, [False, True, True])
    assert n_extra == 1
    assert mask[0, 40:50, 30:42].all() and not mask[0, 5:9, 50:60].any()
    assert np.array_equal(mask & ~(prob == 0.35), fg), "the argmax component keeps its own extent"
    params = CropParams(patch_size=(1, 32, 32))
    with_low = boxes_from_mask(mask, [1.0, 1.0, 1.0], params)[0]
    argmax_only = boxes_from_mask(fg, [1.0, 1.0, 1.0], params)[0]
    assert len(with_low) == 2 and argmax_only.tolist()[0] in with_low.tolist()
    # no threshold: the argmax components alone; a lower floor takes the noise too
    assert np.array_equal(recall_proposals(fg, prob, None, [False, True, True])[0], fg)
    assert recall_proposals(fg, prob, 0.15, [False, True, True])[1] == 2
    # more candidates than max_extra: the most probable first
    mask, n_extra = recall_proposals(fg, prob, 0.15, [False, True, True], max_extra=1)
    assert n_extra == 1 and mask[0, 40:50, 30:42].all() and not mask[0, 5:9, 50:60].any()
    # torch input (any device) gives the same mask
    mask_t, _ = recall_proposals(torch.from_numpy(fg), torch.from_numpy(prob), 0.3, [False, True, True])
    assert np.array_equal(mask_t, recall_proposals(fg, prob, 0.3, [False, True, True])[0])


def test_proposals_of_a_2d_stage_never_connect_across_slices():
    prob = np.zeros((3, 16, 16), np.float32)
    prob[0, 4:8, 4:8] = 0.9
    prob[1, 4:8, 4:8] = 0.35  # under the object of slice 0: a separate proposal for a 2D stage
    mask, n_extra = recall_proposals(prob > 0.5, prob, 0.3, [False, True, True])
    assert n_extra == 1 and mask[1].sum() == 16
    _, n_extra_3d = recall_proposals(prob > 0.5, prob, 0.3, [True, True, True])
    assert n_extra_3d == 0, "a 3D stage sees one object across the slices"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), fill=st.floats(0.0, 0.6))
def test_negative_boxes_hold_no_foreground_and_stay_inside_the_image(seed, depth, fill):
    rng = np.random.default_rng(seed)
    shape = (depth, int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    mask = np.zeros(shape, bool)
    for _ in range(int(fill * 10)):  # random rectangles: objects
        y, x = rng.integers(0, shape[1] - 4), rng.integers(0, shape[2] - 4)
        mask[rng.integers(depth), y:y + rng.integers(3, 15), x:x + rng.integers(3, 15)] = True
    sizes = np.array([[1, 10, 12], [1, 6, 6]])

    def free(box):
        return not mask[tuple(slice(lo, hi) for lo, hi in box)].any()

    for shrink in (1.0, 0.85):
        for draw in range(5):
            box = sample_negative_box(shape, sizes, [False, True, True], free, np.random.default_rng(seed + draw),
                                      shrink=shrink, min_size=(1, 4, 4))
            if box is None:
                continue
            assert box.dtype.kind == "i" and box.shape == (3, 2)
            assert np.all(box[:, 0] >= 0) and np.all(box[:, 1] <= shape) and box[0, 1] - box[0, 0] == 1
            assert not mask[tuple(slice(lo, hi) for lo, hi in box)].any()
            side = box[1:, 1] - box[1:, 0]
            low = 0.75 * 6 - 1 if shrink == 1 else 4  # object-sized, or shrunk but never below min_size
            assert np.all(side >= low) and np.all(side <= 1.25 * np.array([10, 12]) + 1), (shrink, side)
    nearly_full = np.ones((1, 24, 24), bool)
    nearly_full[:, :16, :16] = False  # a 16 x 16 corner is all the objects leave free
    corner = [sample_negative_box((1, 24, 24), np.array([[1, 24, 24]]), [False, True, True], lambda b: not nearly_full[
        tuple(slice(lo, hi) for lo, hi in b)].any(), np.random.default_rng(seed + draw), shrink=shrink,
        min_size=(1, 4, 4)) for shrink in (1.0, 0.85) for draw in range(3)]
    assert all(b is None for b in corner[:3]), "object-sized negatives (18 px or more) never fit in 16 x 16"
    assert any(b is not None and np.all(b[1:, 1] <= 16) for b in corner[3:]), "shrunk ones do"
    full = np.ones(shape, bool)
    assert sample_negative_box(shape, sizes, [False, True, True], lambda b: not full[tuple(
        slice(lo, hi) for lo, hi in b)].any(), rng) is None, "an image objects fill has no negative"


def test_plans_without_the_issue_22_keys_keep_the_published_behaviour():
    old = CropParams.from_dict({"patch_size": [1, 32, 32]})
    assert old.proposal_threshold is None and old.negative_fraction == 0.0 and old.proposal_confirmation is None
    assert CropParams(patch_size=(1, 32, 32)) == old, "the defaults are the published method (measured)"
    new = CropParams(patch_size=(1, 32, 32), proposal_threshold=0.3, negative_fraction=0.25, proposal_confirmation=0.8)
    assert CropParams.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match=r"proposal_threshold must be in \(0, 0.5\]"):
        CropParams(patch_size=(1, 32, 32), proposal_threshold=0.7)
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match=r"proposal_confirmation must be in \[0.5, 1\)"):
            CropParams(patch_size=(1, 32, 32), proposal_confirmation=bad)
    with pytest.raises(ValueError, match="negative_fraction must be in"):
        CropParams(patch_size=(1, 32, 32), negative_fraction=1.0)
