"""The cascade as one core function (:func:`nnunet_stseg.core.cascade.segment_then_segment`), without
nnU-Net: oracle coarse maps made from known label maps and fine "networks" whose output is known.

A fine network that gives back its crop's own classes (an "identity" on one-hot or region images,
or the crop's intensity threshold) must reproduce the label map exactly when every box is at most
half the patch per axis (crops upsampled by >= 2: linear interpolation there and back keeps every
voxel's class). So the assertions are exact label maps and boxes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_stseg.core.cascade import CascadeResult, segment_then_segment
from nnunet_stseg.core.geometry import CropParams, upsample_probabilities

SPACING = [1.0, 1.0, 1.0]
PATCH_2D = CropParams(patch_size=(1, 32, 32))


def one_hot(labels: np.ndarray, k: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels == c for c in range(k)]).astype(np.float32))


def region_maps(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([labels > 0, labels == 2]).astype(np.float32))


class Identity:
    """Logits whose softmax (sigmoid with ``multilabel``) is the crop itself; records each batch."""

    def __init__(self, multilabel: bool = False):
        self.multilabel, self.batches = multilabel, []

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(crops.shape))
        p = crops.clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p) if self.multilabel else torch.log(p)


class Threshold(Identity):
    """Two-class logits: foreground where the crop's intensity is at least 0.5, sure of it."""

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(crops.shape))
        fg = crops[:, :1] >= 0.5
        return torch.cat([~fg, fg], 1).float() * 20 - 10


def label_map(result: CascadeResult) -> np.ndarray:
    return result.probabilities.float().argmax(0).numpy()


def three_objects() -> np.ndarray:
    """(1, 64, 64): class 1 at [10:18, 8:16] and [50:56, 20:26], class 2 at [30:36, 40:48]."""
    labels = np.zeros((1, 64, 64), np.int64)
    labels[0, 10:18, 8:16] = 1
    labels[0, 30:36, 40:48] = 2
    labels[0, 50:56, 20:26] = 1
    return labels


# squared (side 8 or 6 or 8) + a margin of 4 voxels on each side, centred on the object
THREE_BOXES = [[[0, 1], [6, 22], [4, 20]], [[0, 1], [25, 41], [36, 52]], [[0, 1], [46, 60], [16, 30]]]


def test_oracle_coarse_and_identity_fine_reproduce_the_label_map():
    labels = three_objects()
    fine = Identity()
    out = segment_then_segment(one_hot(labels), one_hot(labels), fine, PATCH_2D, multilabel=False,
                               fine_spacing=SPACING, fine_dims=2)
    assert out.boxes.tolist() == THREE_BOXES and out.fallback is None and out.found.n_dropped == 0
    assert out.found.tight_boxes.tolist() == [[[0, 1], [10, 18], [8, 16]], [[0, 1], [30, 36], [40, 48]],
                                              [[0, 1], [50, 56], [20, 26]]]
    assert out.probabilities.dtype == torch.float16 and out.probabilities.shape == (3, 1, 64, 64)
    assert np.array_equal(label_map(out), labels)
    assert fine.batches == [(3, 3, 32, 32)]  # the 2D network gets (N, C, S, S)
    assert out.confidence is None and out.rejected is None and not out.below.any()
    assert set(out.seconds) == {"coarse_decision", "coarse_to_full_grid", "geometry", "fine_network"}


def test_objects_found_on_a_coarser_grid_give_the_same_boxes():
    """The coarse model's grid at half the resolution: components there, tight boxes from the
    upsampled canvas, the same crops and label map as an oracle on the full grid."""
    labels = three_objects()
    coarse = one_hot(labels[:, ::2, ::2])  # every object starts and ends on even voxels: exact at half
    out = segment_then_segment(coarse, one_hot(labels), Identity(), PATCH_2D, multilabel=False,
                               fine_spacing=SPACING, fine_dims=2)
    assert out.found.labels.shape == (1, 32, 32)
    assert out.boxes.tolist() == THREE_BOXES
    assert np.array_equal(label_map(out), labels)


def test_more_objects_than_one_batch_fuse_batch_by_batch_to_the_same_result():
    labels = np.zeros((1, 64, 64), np.int64)
    for i in range(4):
        for j in range(3):
            labels[0, 4 + 15 * i:10 + 15 * i, 6 + 20 * j:12 + 20 * j] = 1 + (i + j) % 2
    image = one_hot(labels)
    events = []
    whole, fine = Identity(), Identity()
    one = segment_then_segment(one_hot(labels), image, whole, PATCH_2D, multilabel=False, fine_spacing=SPACING,
                               fine_dims=2)
    batched = segment_then_segment(one_hot(labels), image, fine, PATCH_2D, multilabel=False, fine_spacing=SPACING,
                                   fine_dims=2, batch=5, on_objects=lambda r: events.append(("objects", len(r.boxes))),
                                   free_memory=lambda: events.append("free"))
    assert whole.batches == [(12, 3, 32, 32)]
    assert [b[0] for b in fine.batches] == [5, 5, 2]
    assert events == ["free", ("objects", 12), "free", "free", "free"]  # the objects before any fine pass
    assert torch.equal(batched.probabilities, one.probabilities)
    assert np.array_equal(label_map(batched), labels)


@pytest.mark.parametrize("fallback", ["coarse", "whole"])
def test_an_empty_coarse_map_falls_back(fallback):
    labels = np.zeros((1, 64, 64), np.int64)
    labels[0, 20:40, 24:44] = 1  # in the image only: the coarse model saw nothing
    coarse = one_hot(np.zeros_like(labels), 2)
    fine = Threshold()
    out = segment_then_segment(coarse, torch.from_numpy(labels[None].astype(np.float32)), fine, PATCH_2D,
                               multilabel=False, fine_spacing=SPACING, fallback=fallback, fine_dims=2, score=True)
    assert out.fallback == fallback and len(out.found.ids) == 0 and out.confidence is None
    if fallback == "coarse":
        assert fine.batches == [] and out.boxes.shape == (0, 3, 2) and "fine_network" not in out.seconds
        assert torch.equal(out.probabilities, upsample_probabilities(coarse, (1, 64, 64), torch.float16))
    else:  # one crop of the whole (single-slice) image, 64 -> 32 -> 64
        assert fine.batches == [(1, 1, 32, 32)] and out.boxes.tolist() == [[[0, 1], [0, 64], [0, 64]]]
        assert np.array_equal(label_map(out), labels)


def test_components_below_the_size_rule_become_background_even_with_the_coarse_fallback():
    speck = np.zeros((1, 64, 64), np.int64)
    speck[0, 10:12, 10:12] = 1
    out = segment_then_segment(one_hot(speck, 2), one_hot(speck, 2), Identity(), PATCH_2D, multilabel=False,
                               fine_spacing=SPACING, fallback="coarse", fine_dims=2)
    assert out.found.n_dropped == 1 and out.found.dropped_boxes.tolist() == [[[0, 1], [10, 12], [10, 12]]]
    assert not label_map(out).any()
    # with a smaller size rule it is an object, and the fine pass keeps it
    small = segment_then_segment(one_hot(speck, 2), one_hot(speck, 2), Identity(), CropParams((1, 32, 32),
                                 min_object_size=1), multilabel=False, fine_spacing=SPACING, fine_dims=2)
    assert small.found.n_dropped == 0 and np.array_equal(label_map(small), speck)


def test_regions_reproduce_every_region_map():
    labels = three_objects()
    fine = Identity(multilabel=True)
    out = segment_then_segment(region_maps(labels), region_maps(labels), fine, PATCH_2D, multilabel=True,
                               fine_spacing=SPACING, fine_dims=2)
    assert out.boxes.tolist() == THREE_BOXES and fine.batches == [(3, 2, 32, 32)]
    assert torch.equal(out.probabilities.float() > 0.5, region_maps(labels) > 0.5)


def test_a_3d_stage_and_a_2d_stage_slice_by_slice():
    labels = np.zeros((12, 32, 32), np.int64)
    labels[2:8, 4:10, 6:12] = 1
    labels[5:10, 20:26, 18:24] = 2
    fine3d = Identity()
    out = segment_then_segment(one_hot(labels), one_hot(labels), fine3d, CropParams((32, 32, 32)),
                               multilabel=False, fine_spacing=SPACING)
    assert fine3d.batches == [(2, 3, 32, 32, 32)]
    assert out.boxes.tolist() == [[[0, 12], [0, 14], [2, 16]], [[0, 12], [16, 30], [14, 28]]]  # 14 cut to the 12 slices
    assert np.array_equal(label_map(out), labels)
    fine2d = Identity()
    out = segment_then_segment(one_hot(labels), one_hot(labels), fine2d, PATCH_2D, multilabel=False,
                               fine_spacing=SPACING, fine_dims=2)
    assert fine2d.batches == [(11, 3, 32, 32)]  # one object per slice it holds (2:8 and 5:10)
    assert np.array_equal(label_map(out), labels)


def test_proposals_below_the_decision_are_confirmed_by_the_fine_stage():
    """Recall-first proposals (coarse foreground 0.35 < the decision): the real object (present in
    the image) is confirmed and fused, the false one (absent from the image) rejected; the argmax
    object is fused without a question."""
    shape = (1, 64, 64)
    sure, real, false = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    sure[0, 8:14, 8:14], real[0, 30:36, 30:36], false[0, 50:56, 50:56] = True, True, True
    fg = np.where(sure, 1.0, np.where(real | false, 0.35, 0.0)).astype(np.float32)
    coarse = torch.from_numpy(np.stack([1 - fg, fg]))
    image = torch.from_numpy((sure | real)[None].astype(np.float32))
    crop = CropParams((1, 32, 32), proposal_threshold=0.3, proposal_confirmation=0.9)
    out = segment_then_segment(coarse, image, Threshold(), crop, multilabel=False, fine_spacing=SPACING, fine_dims=2)
    assert out.n_extra == 2 and out.below.tolist() == [False, True, True]
    assert out.rejected.tolist() == [False, False, True] and out.confidence.round(3).tolist() == [1.0, 1.0, 0.0]
    assert np.array_equal(label_map(out), (sure | real).astype(np.int64))
    assert torch.all(out.probabilities[1][torch.from_numpy(false)] == torch.tensor(0.35, dtype=torch.float16))
    # without confirmation every proposal is fused: the false one's crop says background there
    fused = segment_then_segment(coarse, image, Threshold(), CropParams((1, 32, 32), proposal_threshold=0.3),
                                 multilabel=False, fine_spacing=SPACING, fine_dims=2)
    assert fused.rejected is None and fused.confidence is None
    assert np.array_equal(label_map(fused), (sure | real).astype(np.int64))
    assert torch.all(fused.probabilities[1][torch.from_numpy(false)] < 0.01)


def test_an_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback"):
        segment_then_segment(one_hot(three_objects()), one_hot(three_objects()), Identity(), PATCH_2D,
                             multilabel=False, fine_spacing=SPACING, fallback="nothing")


# ----------------------------------------------------------------------------------------------
# the label map without a full-size canvas (to_labels) against the canvas converted as a whole
# ----------------------------------------------------------------------------------------------
def export_labels(multilabel: bool):
    """The export's conversion of fused probabilities (K, *region) float16: their logits
    (:func:`probabilities_to_logits`, as the predictor hands them to nnU-Net), then the first
    largest class, or the regions in order."""
    from nnunet_stseg.core.geometry import probabilities_to_logits

    def convert(p: torch.Tensor) -> np.ndarray:
        logits = probabilities_to_logits(p.clone(), multilabel, inplace=True).float()
        if not multilabel:
            return logits.argmax(0).to(torch.uint8).numpy()
        out = np.zeros(p.shape[1:], np.uint8)
        for i, region in enumerate(logits):
            out[(torch.sigmoid(region) > 0.5).numpy()] = i + 1
        return out
    return convert


def random_case(seed: int, shape: tuple[int, ...], grid: tuple[int, ...], k: int, multilabel: bool, density: float):
    """Coarse probabilities (K, *grid) of smooth random blobs (touching and separate ones, on the
    border), an image (1, *shape), and a fine 'network' that segments the image by intensity with a
    class pattern of its own (crops of one object disagree where they overlap)."""
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand((1, k, *(max(2, n // 2) for n in grid)), generator=g),
                                            size=grid, mode="trilinear", align_corners=False)[0]
    field[0] += density  # background's margin: larger = fewer, smaller objects
    coarse = torch.sigmoid((field[1:] - field[:1]) * 12) if multilabel else torch.softmax(field * 12, 0)
    image = torch.nn.functional.interpolate(torch.rand((1, 1, *(max(2, n // 4) for n in shape)), generator=g),
                                            size=shape, mode="trilinear", align_corners=False)[0]

    def fine(crops: torch.Tensor) -> torch.Tensor:
        x = crops[:, :1]
        channels = [(x - 0.5) * 9 * (c + 1) * (-1) ** c + torch.sin(17 * x * (c + 1)) for c in range(k - 1 if multilabel else k)]
        return torch.cat(channels, 1)
    return coarse, image, fine


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("case", ["3d", "3d regions", "2d stage", "proposals", "whole", "empty", "3d slabs",
                                  "3d regions slabs", "3d two classes", "3d two classes slabs"])
def test_label_map_without_canvas_is_the_canvas_converted(case, seed, monkeypatch):
    """``to_labels``: the label map built crop group by crop group equals, voxel for voxel, the
    full canvas converted as a whole (what the export made of it before), for many touching and
    separate objects, objects on the border, overlapping crops fused across batches, regions, a 2D
    stage, recall-first proposals with confirmation, both fallbacks, an empty volume, one
    foreground class (its own fast paths), and groups fused a slab of 3 slices at a time (slabs
    that cut boxes, boxes that miss a slab), converted a slice at a time."""
    from nnunet_stseg.core import cascade

    if case.endswith("slabs"):
        monkeypatch.setattr(cascade, "GROUP_SLAB_VOXELS", 3 * 64 * 72)
        monkeypatch.setattr(cascade, "LABEL_CHUNK_VOXELS", 64 * 72)
        case = case[:-len(" slabs")]
    multilabel = case == "3d regions"
    k = 2 if case == "3d two classes" else 3
    shape, grid = ((1, 64, 72), (1, 16, 18)) if case == "2d stage" else ((16, 64, 72), (4, 16, 18))
    density = {"empty": 5.0, "whole": 5.0}.get(case, {"2d stage": 0.2, "3d two classes": 0.05}.get(case, 0.35)
                                                + 0.1 * (seed % 3))
    coarse, image, fine = random_case(seed, shape, grid, k, multilabel, density)
    params = dict(patch_size=(1, 16, 16) if case == "2d stage" else (8, 12, 12), min_object_size=3)
    if case == "proposals":
        params.update(proposal_threshold=0.3, proposal_confirmation=0.9)
    crop = CropParams(**params)
    common = dict(multilabel=multilabel, fine_spacing=SPACING, fine_dims=2 if case == "2d stage" else 3,
                  fallback="whole" if case == "whole" else "coarse", batch=3, max_crops=40)
    whole = segment_then_segment(coarse, image, fine, crop, **common)
    expected = export_labels(multilabel)(whole.probabilities)
    lazy = segment_then_segment(coarse, image, fine, crop, to_labels=export_labels(multilabel), **common)
    assert lazy.probabilities is None and lazy.labels.shape == shape
    np.testing.assert_array_equal(lazy.labels, expected)
    np.testing.assert_array_equal(lazy.boxes, whole.boxes)
    assert lazy.fallback == whole.fallback and "to_labels" in lazy.seconds
    if case == "empty":
        assert whole.fallback == "coarse" and not expected.any()
    elif case == "whole":
        assert whole.fallback == "whole"
    else:
        assert len(whole.boxes) >= 2 and expected.any()
