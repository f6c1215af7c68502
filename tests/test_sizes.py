"""Object sizes (seed 004): the chessboard distance transform against scipy, the bulk flip
evaluation against flipping one pixel at a time, and the single-sample estimator against the
exact gradient enumerated on a tiny image."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_cdt

from nnunet_stseg.core.sizes import (chessboard_distance, flip_candidates, flipped_sizes, object_size, sample_masks,
                                     size_loss_gradient, squared_size_error)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _hand_built() -> list[np.ndarray]:
    masks = []
    masks.append(np.zeros((6, 7), bool))  # empty
    masks.append(np.ones((6, 7), bool))  # full (no background: our convention, scipy says -1)
    one = np.zeros((6, 7), bool); one[3, 2] = True; masks.append(one)  # noqa: E702
    corner = np.zeros((6, 7), bool); corner[:4, :5] = True; masks.append(corner)  # touches two borders  # noqa: E702
    thin = np.zeros((5, 20), bool); thin[1:3, 1:19] = True; masks.append(thin)  # elongated  # noqa: E702
    hole = np.ones((9, 9), bool); hole[4, 4] = False; masks.append(hole)  # noqa: E702
    ring = np.zeros((11, 11), bool); ring[1:10, 1:10] = True; ring[4:7, 4:7] = False; masks.append(ring)  # noqa: E702
    yy, xx = np.mgrid[:15, :21]
    masks.append(((yy - 7) / 6.0) ** 2 + ((xx - 10) / 9.0) ** 2 <= 1)  # ellipse
    return masks


def _random(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = rng.integers(1, 13, 2)
        if i % 2:
            m = rng.random((h, w)) < rng.uniform(0.3, 0.95)
        else:
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h), rng.integers(0, w)
            m[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, w + 1)] = True
        out.append(m)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_distance_transform_equals_scipy_chessboard(device):
    for m in _hand_built() + _random(150):
        d = chessboard_distance(torch.from_numpy(m)[None].to(device))[0].cpu().numpy()
        if m.all():
            assert (d == max(m.shape)).all()  # no background anywhere: documented convention
            assert (distance_transform_cdt(m, metric="chessboard") == -1).all()
        else:
            np.testing.assert_array_equal(d, distance_transform_cdt(m, metric="chessboard"), err_msg=str(m.astype(int)))


def test_distance_transform_is_batched():
    masks = _random(6, seed=3)
    h, w = max(m.shape[0] for m in masks), max(m.shape[1] for m in masks)
    batch = np.zeros((len(masks), h, w), bool)
    for i, m in enumerate(masks):
        batch[i, :m.shape[0], :m.shape[1]] = m
    together = chessboard_distance(torch.from_numpy(batch))
    for i in range(len(masks)):
        np.testing.assert_array_equal(together[i].numpy(), chessboard_distance(torch.from_numpy(batch[i])[None])[0])


def test_sizes_of_hand_built_masks():
    square = np.zeros((10, 10), bool); square[2:7, 2:7] = True  # noqa: E702
    touching = np.zeros((10, 10), bool); touching[:5, :5] = True  # outside is not background  # noqa: E702
    masks = torch.from_numpy(np.stack([np.zeros((10, 10), bool), square, touching]))
    assert object_size(masks).tolist() == [0, 6, 10]
    assert squared_size_error(masks, torch.tensor([0.0, 8.0, 10.0])).tolist() == [0.0, 4.0, 0.0]
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        object_size(torch.zeros(10, 10, dtype=torch.bool))


def _flipped_one_at_a_time(m: np.ndarray) -> np.ndarray:
    out = np.zeros(m.shape, np.int64)
    for y, x in itertools.product(range(m.shape[0]), range(m.shape[1])):
        f = m.copy()
        f[y, x] = ~f[y, x]
        out[y, x] = int(object_size(torch.from_numpy(f)[None])[0])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_bulk_flips_equal_one_distance_transform_per_flip(device):
    for m in _hand_built() + _random(80, seed=1):
        bulk = flipped_sizes(torch.from_numpy(m)[None].to(device))[0].cpu().numpy()
        np.testing.assert_array_equal(bulk, _flipped_one_at_a_time(m), err_msg=str(m.astype(int)))


def test_only_the_object_and_its_border_can_change_the_size():
    for m in _hand_built() + _random(80, seed=2):
        t = torch.from_numpy(m)[None]
        outside = ~flip_candidates(t)[0].numpy()
        assert (_flipped_one_at_a_time(m)[outside] == int(object_size(t)[0])).all()
    small = np.zeros((7, 7), bool)
    small[3, 3] = True
    assert flip_candidates(torch.from_numpy(small)[None])[0].sum() == 9


def _estimator_one_at_a_time(y: np.ndarray, target: float) -> np.ndarray:
    """y_i (l(y) - l(y flipped at i)) with one distance transform per flip (the naive method)."""
    here = (target - int(object_size(torch.from_numpy(y)[None])[0])) ** 2 / target ** 2
    flipped = _flipped_one_at_a_time(y)
    return np.where(y, 1.0, -1.0) * (here - (target - flipped) ** 2 / target ** 2)


def test_estimator_equals_the_flip_every_pixel_estimator_for_the_same_sample():
    rng = np.random.default_rng(4)
    p = torch.from_numpy(rng.uniform(0.05, 0.95, (3, 9, 11)).astype(np.float32))
    targets = torch.tensor([4.0, 6.0, 2.0])
    gen = torch.Generator().manual_seed(7)
    grad, _ = size_loss_gradient(p, targets, samples=1, generator=gen)
    y = sample_masks(p, torch.Generator().manual_seed(7))  # the same draw
    for b in range(3):
        np.testing.assert_allclose(grad[b].numpy(), _estimator_one_at_a_time(y[b].numpy(), float(targets[b])),
                                   rtol=0, atol=1e-6)
        assert (grad[b].numpy()[~flip_candidates(y[b:b + 1])[0].numpy()] == 0).all()


def _exact_gradient(p: np.ndarray, target: float) -> np.ndarray:
    """d E[(s - g(Y))^2 / s^2] / d p_i by enumerating all 2^V masks."""
    shape, v = p.shape, p.size
    flat = p.ravel()
    grad = np.zeros(v)
    masks = np.array(list(itertools.product([False, True], repeat=v)))
    loss = (target - object_size(torch.from_numpy(masks.reshape(-1, *shape))).numpy()) ** 2 / target ** 2
    for i in range(v):
        others = np.delete(np.arange(v), i)
        prob_others = np.prod(np.where(masks[:, others], flat[others], 1 - flat[others]), axis=1)
        grad[i] = np.sum(prob_others * np.where(masks[:, i], loss, -loss))
    return grad.reshape(shape)


def test_estimator_is_unbiased_on_a_tiny_image():
    p = np.array([[0.2, 0.7, 0.5], [0.9, 0.4, 0.6]], dtype=np.float32)
    target = 4.0
    exact = _exact_gradient(p.astype(np.float64), target)
    n = 40000
    batch = torch.from_numpy(np.broadcast_to(p, (n, *p.shape)).copy())
    grad, _ = size_loss_gradient(batch, torch.full((n,), target), generator=torch.Generator().manual_seed(0))
    mean = grad.double().mean(0).numpy()
    stderr = grad.double().std(0).numpy() / np.sqrt(n)
    assert np.abs(mean - exact).max() < 4 * stderr.max() + 1e-9, (mean, exact, stderr)
    assert np.abs(exact).max() > 10 * stderr.max()  # the test has power: the gradient is far from zero


def test_surrogate_loss_pushes_a_too_small_object_to_grow():
    """(gradient * p).sum() back-propagates the estimate; averaged over samples, a prediction
    smaller than its target size gets its uncertain border raised. (Single flips only see what one
    pixel changes: a certain 4 x 4 square with a certain background around it gets no gradient,
    because no single added pixel makes it larger; docs/design.md.)"""
    logits = torch.full((1, 12, 12), -4.0)
    logits[0, 3:9, 3:9] = 0.0  # an uncertain ring around
    logits[0, 4:8, 4:8] = 4.0  # a 4 x 4 square: size 4
    logits.requires_grad_(True)
    p = torch.sigmoid(logits)
    grad, _ = size_loss_gradient(p.detach(), torch.tensor([10.0]), samples=64,
                                 generator=torch.Generator().manual_seed(0))
    (grad * p).sum().backward()
    ring = torch.zeros(12, 12, dtype=torch.bool)
    ring[3:9, 3:9] = True
    ring[4:8, 4:8] = False
    assert logits.grad[0][ring].mean() < 0  # gradient descent raises the logits around the object
    assert logits.grad[0][0, 0] == 0  # far from the object nothing changes the size
    shrink, _ = size_loss_gradient(p.detach(), torch.tensor([2.0]), samples=64,
                                   generator=torch.Generator().manual_seed(0))
    assert shrink[0][ring].mean() > 0  # a target below the prediction lowers the same probabilities


def test_estimator_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="target_sizes"):
        size_loss_gradient(torch.rand(2, 5, 5), torch.tensor([3.0]))
