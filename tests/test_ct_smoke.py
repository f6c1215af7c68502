"""Geometry smoke test on a real CT (3 mm, multi-organ labels) read with nnU-Net's own reader.

Boxes from a "coarse mask" (the label map's foreground), crop -> paste of a one-hot label with
nearest interpolation, and writing the pasted mask back through nnU-Net's writer with the
original geometry. Skipped when the shared data folder is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import CropParams, boxes_from_mask, crop_and_resample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-smoke"
CT_SM, SEG, CT_BIG = DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz", DATA / "example_ct.nii.gz"
PATCH = (64, 64, 64)

pytestmark = pytest.mark.skipif(not (CT_SM.is_file() and SEG.is_file()),
                                reason=f"CT smoke data not found in {DATA} (expects example_ct_sm.nii.gz and "
                                       f"example_seg.nii.gz from the shared data folder)")


def _io():
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return SimpleITKIO()


@pytest.fixture(scope="module")
def ct():
    img, img_props = _io().read_images([str(CT_SM)])
    seg, seg_props = _io().read_seg(str(SEG))
    return img, img_props, seg, seg_props


def _components(mask: np.ndarray) -> list[tuple[slice, ...]]:
    """Independent reference: 26-connected components and their bounding slices."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return labels, ndimage.find_objects(labels, max_label=n)


def _assert_inside(boxes: np.ndarray, shape) -> None:
    shape = np.asarray(shape)
    assert boxes.ndim == 3 and boxes.shape[1:] == (len(shape), 2)
    assert np.issubdtype(boxes.dtype, np.integer)
    assert np.all(boxes[:, :, 0] >= 0), boxes
    assert np.all(boxes[:, :, 1] <= shape[None]), boxes
    assert np.all(boxes[:, :, 1] > boxes[:, :, 0]), boxes


def _check_boxes(mask: np.ndarray, spacing, params: CropParams) -> tuple[np.ndarray, int, int]:
    boxes, n_dropped = boxes_from_mask(mask, spacing, params)
    _assert_inside(boxes, mask.shape)
    labels, slices = _components(mask)
    # the component count adds up, and exactly the components thinner than min_object_size are dropped
    threshold = params.min_object_size * min(spacing)
    small = [i for i, sl in enumerate(slices)
             if any((s.stop - s.start) * sp < threshold - 1e-6 for s, sp in zip(sl, spacing))]
    assert len(boxes) + n_dropped == len(slices)
    assert n_dropped == len(small)
    # every voxel of a kept component lies in some box
    covered = np.zeros(mask.shape, dtype=bool)
    for b in boxes:
        covered[tuple(slice(a, e) for a, e in b)] = True
    kept = mask & ~np.isin(labels, [i + 1 for i in small])
    assert not np.any(kept & ~covered)
    return boxes, n_dropped, len(slices)


def test_reader_geometry(ct):
    img, img_props, seg, seg_props = ct
    assert img.ndim == 4 and img.shape[0] == 1
    assert seg.shape == img.shape
    np.testing.assert_allclose(img_props["spacing"], seg_props["spacing"])
    # nnU-Net's spacing is in numpy (z, y, x) order, SimpleITK's in (x, y, z)
    np.testing.assert_allclose(seg_props["spacing"], seg_props["sitk_stuff"]["spacing"][::-1])


def test_boxes_from_foreground_coarse_mask(ct):
    _, _, seg, props = ct
    label = seg[0].astype(np.int64)
    mask = label > 0
    boxes, n_dropped, n_components = _check_boxes(mask, props["spacing"], CropParams(patch_size=PATCH))
    print(f"\nCT foreground: {n_components} components, {len(boxes)} boxes, {n_dropped} dropped, "
          f"sizes {(boxes[:, :, 1] - boxes[:, :, 0]).tolist()}")
    assert len(boxes) >= 1


def _one_hot(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, inverse = np.unique(label, return_inverse=True)
    assert values[0] == 0
    inverse = inverse.reshape(label.shape)
    oh = np.zeros((len(values), *label.shape), dtype=np.float32)
    np.put_along_axis(oh, inverse[None], 1.0, axis=0)
    return oh, values


def test_nearest_crop_paste_is_exact_on_boxes_not_larger_than_the_patch(ct):
    _, _, seg, props = ct
    label = seg[0].astype(np.int64)
    spacing = props["spacing"]
    params = CropParams(patch_size=PATCH)
    # the foreground is one big box (larger than the patch); per-organ masks give small boxes too
    all_boxes = [boxes_from_mask(label > 0, spacing, params)[0]]
    for v in np.unique(label)[1:]:
        all_boxes.append(boxes_from_mask(label == v, spacing, params)[0])
    boxes = np.concatenate(all_boxes)
    _assert_inside(boxes, label.shape)
    sizes = boxes[:, :, 1] - boxes[:, :, 0]
    small = boxes[np.all(sizes <= np.array(PATCH), axis=1)]
    assert len(small) >= 5, sizes.tolist()
    # the largest few (they overlap each other: fusion must still be exact)
    order = np.argsort(-np.prod(small[:, :, 1] - small[:, :, 0], axis=1))
    small = small[order[:6]]
    oh, values = _one_hot(label)
    crops = crop_and_resample(oh, small, PATCH, mode="nearest")
    assert crops.shape == (len(small), len(values), *PATCH)
    fused, covered = fuse_crops(crops, small, label.shape, mode="nearest")
    pasted = values[np.argmax(fused, axis=0)]
    for b in small:
        sl = tuple(slice(a, e) for a, e in b)
        np.testing.assert_array_equal(pasted[sl], label[sl])
    assert np.all(pasted[~covered] == 0)
    expected_cover = np.zeros(label.shape, dtype=bool)
    for b in small:
        expected_cover[tuple(slice(a, e) for a, e in b)] = True
    np.testing.assert_array_equal(covered, expected_cover)


def test_pasted_mask_written_with_original_geometry(ct, tmp_path):
    import SimpleITK as sitk

    _, _, seg, props = ct
    label = seg[0].astype(np.int64)
    params = CropParams(patch_size=PATCH)
    boxes, _ = boxes_from_mask(label > 0, props["spacing"], params)
    oh, values = _one_hot(label)
    crops = crop_and_resample(oh, boxes, PATCH, mode="nearest")
    fused, covered = fuse_crops(crops, boxes, label.shape, mode="nearest")
    pasted = values[np.argmax(fused, axis=0)].astype(np.uint8)
    assert pasted.shape == label.shape
    # the box is larger than the patch along y/x, so the round trip is lossy, but close
    agreement = float(np.mean(pasted[covered] == label[covered]))
    print(f"\nCT paste through a {PATCH} patch: {agreement:.4f} voxel agreement on {covered.sum()} voxels")
    assert agreement > 0.9
    out_file = tmp_path / "pasted.nii.gz"
    _io().write_seg(pasted, str(out_file), props)
    ref, out = sitk.ReadImage(str(SEG)), sitk.ReadImage(str(out_file))
    assert out.GetSize() == ref.GetSize()
    assert out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin()
    assert out.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), pasted)


@pytest.mark.skipif(not CT_BIG.is_file(), reason=f"{CT_BIG} not found")
def test_boxes_on_bone_threshold_of_the_large_ct():
    img, props = _io().read_images([str(CT_BIG)])
    assert img.ndim == 4 and img.shape[0] == 1
    mask = img[0] > 300  # bone (HU)
    assert mask.any()
    params = CropParams(patch_size=PATCH)
    boxes, n_dropped, n_components = _check_boxes(mask, props["spacing"], params)
    print(f"\nCT bone (> 300 HU) on {img.shape[1:]}: {n_components} components, {len(boxes)} boxes, "
          f"{n_dropped} dropped")
    assert len(boxes) >= 1
