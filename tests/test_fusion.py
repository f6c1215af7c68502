"""The polar stage's fusion arithmetic (nnunet_stseg.core.fusion) on hand-built examples: which
regions survive the hysteresis, which class wins inside the fused mask, region outputs, and that
summing the terms batch by batch (as the predictor does) gives the same result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_stseg.core.fusion import fuse_polar_probabilities, fuse_polar_slice, polar_fusion_weights


def softmax_views(*foregrounds: np.ndarray, classes: list[int] | None = None, p: float = 0.9) -> torch.Tensor:
    """(N, K, H, W) probabilities: view i says class ``classes[i]`` (default 1) with probability
    ``p`` on its foreground pixels, background elsewhere; K = 3."""
    n, shape = len(foregrounds), foregrounds[0].shape
    out = torch.zeros((n, 3, *shape))
    for i, fg in enumerate(foregrounds):
        c = (classes or [1] * n)[i]
        fg = torch.as_tensor(fg)
        out[i, c] = torch.where(fg, p, 0.0)
        out[i, 0] = 1 - out[i, c]
    return out


def strip(*ranges: tuple[int, int], width: int = 12) -> np.ndarray:
    m = np.zeros((1, width), bool)
    for a, b in ranges:
        m[0, a:b] = True
    return m


def test_a_region_seen_by_one_view_off_its_origin_is_dropped():
    # both views centre on the object at 1..4; view 1 also predicts 8..10 (off its own origin):
    # object score 2 + 2 = 4, extra 1 -> normalised 0.25 <= 0.4
    views = softmax_views(strip((1, 4)), strip((1, 4), (8, 10)))
    fused = fuse_polar_probabilities(views, [[0, 2], [0, 2]], multilabel=False)
    assert fused.argmax(0)[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert torch.allclose(fused.sum(0), torch.ones(1, 12)), "probabilities per pixel"


def test_a_region_that_is_some_views_own_object_is_kept():
    # view 1 is centred on the second object: A scores 2 (view 0) + 1 (view 1, off its origin) = 3,
    # B scores 2 (view 1's own object) -> 2 / 3 > 0.4
    views = softmax_views(strip((1, 4)), strip((1, 4), (8, 10)))
    fused = fuse_polar_probabilities(views, [[0, 2], [0, 9]], multilabel=False)
    assert fused.argmax(0)[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("high,kept", [(0.2, True), (0.3, False)])
def test_the_hysteresis_threshold_decides(high, kept):
    # the extra region scores 1 / 4 = 0.25 of the maximum
    views = softmax_views(strip((1, 4)), strip((1, 4), (8, 10)))
    fused = fuse_polar_probabilities(views, [[0, 2], [0, 2]], multilabel=False, high=high)
    assert bool(fused.argmax(0)[0, 8]) is kept


def test_the_class_inside_the_mask_is_the_weighted_mean():
    # view 0 centred on the object says class 2, view 1 (origin elsewhere) says class 1 on it:
    # weights 2 vs 1, so class 2 wins; equal weights would tie the probabilities
    views = softmax_views(strip((1, 5)), strip((1, 5)), classes=[2, 1], p=0.8)
    fused = fuse_polar_probabilities(views, [[0, 3], [0, 10]], multilabel=False)
    assert fused.argmax(0)[0, 1:5].tolist() == [2, 2, 2, 2]
    np.testing.assert_allclose(fused[2, 0, 1].item(), (2 * 0.8) / (2 * 0.8 + 1 * 0.8), rtol=1e-5)
    assert fused[0, 0, 1].item() == 0.0 and fused[0, 0, 0].item() == 1.0, "background 0 inside, 1 outside"


def test_region_outputs_keep_the_mean_and_lift_the_strongest_region():
    # regions (sigmoid) R = 2: inside the object region 0 has mean 0.45 (below 0.5) and region 1
    # 0.2; the fused mask says "object", so the strongest region is lifted just above 0.5
    views = torch.zeros((2, 2, 1, 8))
    views[:, 0, 0, 2:5] = torch.tensor([0.6, 0.3]).view(2, 1)
    views[:, 1, 0, 2:5] = 0.2
    score, class_weights = polar_fusion_weights(views, [[0, 3], [0, 3]], multilabel=True)
    assert score[0, 0].tolist() == [0, 0, 2, 2, 2, 0, 0, 0] and score[1].sum() == 0, "view 1 predicts nothing > 0.5"
    fused = fuse_polar_probabilities(views, [[0, 3], [0, 3]], multilabel=True)
    assert torch.all(fused[0, 0, 2:5] > 0.5) and torch.allclose(fused[1, 0, 2:5], torch.full((3,), 0.2))
    assert fused[:, 0, :2].abs().sum() == 0 and fused[:, 0, 5:].abs().sum() == 0, "0 outside the mask"


def test_no_foreground_anywhere_is_background():
    views = softmax_views(strip(), strip())
    fused = fuse_polar_probabilities(views, [[0, 2], [0, 7]], multilabel=False)
    assert fused[0].eq(1).all() and fused[1:].eq(0).all()


def test_batchwise_sums_equal_the_one_call():
    rng = np.random.default_rng(0)
    views = softmax_views(*(rng.random((6, 6)) > 0.5 for _ in range(5)), classes=[1, 2, 1, 2, 1])
    origins = rng.integers(0, 6, size=(5, 2)).astype(float)
    one = fuse_polar_probabilities(views, origins, multilabel=False)
    score, class_sum, weight_sum = np.zeros((6, 6), np.float32), torch.zeros((3, 6, 6)), torch.zeros((6, 6))
    for batch in (slice(0, 2), slice(2, 5)):
        s, w = polar_fusion_weights(views[batch], origins[batch], multilabel=False)
        score += s.sum(0)
        class_sum += (w[:, None] * views[batch]).sum(0)
        weight_sum += w.sum(0)
    assert torch.allclose(fuse_polar_slice(score, class_sum, weight_sum, multilabel=False), one)


def test_fuse_crops_keeps_the_callers_probabilities_outside_crops_and_replaces_them_inside():
    """With ``background`` (the cascade passes the coarse probabilities): outside every crop the
    canvas keeps them (soft, so an ensemble can average them); inside a crop the crop replaces them
    even where they said foreground more strongly; crops fused in two batches give the same."""
    import torch

    from nnunet_stseg.core.fusion import fuse_crops

    background = torch.zeros((2, 6, 6))
    background[0], background[1] = 0.8, 0.2
    background[:, 1, 1] = torch.tensor([0.1, 0.9])  # the coarse model's confident foreground inside crop 1
    crops = torch.zeros((2, 2, 2, 2))
    crops[:, 0], crops[:, 1] = 0.7, 0.3
    crops[1, :, 0, 0] = torch.tensor([0.4, 0.6])
    boxes = np.array([[[0, 2], [0, 2]], [[1, 3], [1, 3]]])
    fused, covered = fuse_crops(crops, boxes, (6, 6), mode="nearest", background=background.clone())
    assert torch.equal(fused[:, 5, 5], torch.tensor([0.8, 0.2])), "outside: the caller's probabilities"
    assert torch.allclose(fused[:, 0, 0], torch.tensor([0.7, 0.3])), "inside: replaced, not fused with them"
    assert torch.allclose(fused[:, 1, 1], torch.tensor([0.4, 0.6])), "two crops: max foreground, min background"
    assert int(covered.sum()) == 7
    first, cov = fuse_crops(crops[:1], boxes[:1], (6, 6), mode="nearest", background=background.clone())
    both, _ = fuse_crops(crops[1:], boxes[1:], (6, 6), mode="nearest", out=first, covered=cov)
    assert torch.equal(both, fused)
    plain, _ = fuse_crops(crops, boxes, (6, 6), mode="nearest")
    assert torch.equal(plain[:, 5, 5], torch.tensor([1.0, 0.0])), "without background: certain background"


def test_coverage_as_pasted_boxes_fuses_like_the_coverage_mask():
    """The cascade keeps the boxes pasted so far instead of a full-size mask: overlapping crops,
    fused in one call or batch by batch, give the same canvas as with the mask."""
    import torch

    from nnunet_stseg.core.fusion import fuse_crops

    rng = np.random.default_rng(0)
    shape = (5, 20, 24)
    starts = rng.integers(0, 12, size=(7, 3)) % np.array([4, 12, 12])
    boxes = np.stack([starts, starts + rng.integers(1, 10, size=(7, 3))], axis=2)
    boxes[:, :, 1] = np.minimum(boxes[:, :, 1], shape)
    crops = torch.rand((7, 3, 4, 6, 6), generator=torch.Generator().manual_seed(1)).softmax(1)
    background = torch.rand((3, *shape), generator=torch.Generator().manual_seed(2)).softmax(0)
    masked, mask = fuse_crops(crops, boxes, shape, mode="linear", background=background.clone())
    listed, pasted = fuse_crops(crops[:3], boxes[:3], shape, mode="linear", background=background.clone(), covered=[])
    listed, pasted = fuse_crops(crops[3:], boxes[3:], shape, mode="linear", out=listed, covered=pasted)
    assert len(pasted) == 7 and not torch.equal(masked, background)
    torch.testing.assert_close(listed, masked, rtol=0, atol=0)


def test_large_boxes_pasted_slab_by_slab_give_the_same_canvas(monkeypatch):
    """A box larger than PASTE_SLAB_VOXELS is pasted a few slices at a time (each slab through the
    exact inverse map): the same canvas, within float rounding, as one paste per box."""
    import torch

    from nnunet_stseg.core import fusion
    from nnunet_stseg.core.fusion import fuse_crops

    shape = (12, 16, 16)
    boxes = np.array([[[0, 9], [0, 12], [2, 16]], [[4, 12], [5, 16], [0, 10]]])  # overlapping
    crops = torch.rand((2, 2, 6, 6, 6), generator=torch.Generator().manual_seed(3)).softmax(1)
    background = torch.rand((2, *shape), generator=torch.Generator().manual_seed(4)).softmax(0)
    whole, _ = fuse_crops(crops, boxes, shape, background=background.clone(), covered=[])
    monkeypatch.setattr(fusion, "PASTE_SLAB_VOXELS", 12 * 14)  # one slice of the first box per slab
    assert len(fusion._paste_slabs(boxes[0])) == 9
    slabs, _ = fuse_crops(crops, boxes, shape, background=background.clone(), covered=[])
    masked, _ = fuse_crops(crops, boxes, shape, background=background.clone())
    torch.testing.assert_close(slabs, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked, slabs, rtol=0, atol=0)


@pytest.mark.parametrize("integer", [True, False])
def test_a_window_of_the_canvas_fused_alone_equals_that_window_of_the_whole(integer):
    """``window``: fusing the crops into a canvas of a few slices only (as the label-map path fuses
    a group slab by slab) gives exactly those slices of the whole fusion, for boxes that cross the
    window, lie inside it or miss it, integer or fractional (L-SNet's RoIs, partly outside)."""
    from nnunet_stseg.core.fusion import fuse_crops

    rng = np.random.default_rng(5)
    shape = (14, 18, 20)
    lo = rng.uniform(-2, 10, size=(9, 3))
    boxes = np.stack([lo, lo + rng.uniform(2, 9, size=(9, 3))], axis=2)
    if integer:
        boxes = np.clip(np.round(boxes), 0, np.array(shape)[:, None]).astype(np.int64)
        boxes[:, :, 1] = np.maximum(boxes[:, :, 1], boxes[:, :, 0] + 1)
    crops = torch.rand((9, 3, 4, 5, 5), generator=torch.Generator().manual_seed(6)).softmax(1)
    background = torch.rand((3, *shape), generator=torch.Generator().manual_seed(7)).softmax(0)
    whole, _ = fuse_crops(crops, boxes, shape, background=background.clone(), covered=[])
    for a, b in [(0, 3), (3, 8), (8, 14), (5, 6)]:
        window = np.array([[a, b], [0, shape[1]], [0, shape[2]]])
        part, pasted = fuse_crops(crops, boxes, shape, background=background[:, a:b].clone(), covered=[],
                                  window=window)
        assert len(pasted) == 9  # every box is remembered, those that miss the window too
        torch.testing.assert_close(part, whole[:, a:b], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out has shape \(3, 14, 18, 20\), expected \(3, 2, 18, 20\)"):
        fuse_crops(crops, boxes, shape, out=whole, window=np.array([[0, 2], [0, 18], [0, 20]]))
