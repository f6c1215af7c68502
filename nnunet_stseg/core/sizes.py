"""Object sizes and the size-loss gradient of "Learning to segment from object sizes" (seed 004,
methods.md section 6). Pure torch, batched, on any device; no nnU-Net imports.

Conventions (docs/design.md "Learning from object sizes"):
- The chessboard (L-infinity) distance of a foreground pixel is the distance to the nearest
  BACKGROUND pixel of the image; a foreground pixel touching background (8-neighbourhood) has
  distance 1, background has 0. Pixels outside the image are NOT background (the authors' transform
  and ``scipy.ndimage.distance_transform_cdt(metric='chessboard')``): an object touching the image
  border is measured from its inner edges only. A mask without any background pixel has, at every
  pixel, the distance ``max(H, W)`` (larger than any distance an image with background can have;
  scipy returns -1 there).
- The size of a mask is ``2 x`` its largest distance (0 for an empty mask): the side of the largest
  square that fits into the object, doubled to the authors' definition (a 3 x 3 square has size 4).

All of it rests on one fact: ``d(p) >= k`` exactly when the (2k-1) x (2k-1) window centred at
``p`` (clipped to the image) holds no background pixel. Window counts come from an integral image,
so one "level" k costs O(H W) and a transform costs O(max distance x H W) for a whole batch.
The same window counts give the size after flipping ANY single pixel, for all pixels at once
(:func:`flipped_sizes`), which is what makes the single-sample gradient estimator cheap.
"""
from __future__ import annotations

import torch

__all__ = ["chessboard_distance", "object_size", "flipped_sizes", "flip_candidates", "sample_masks",
           "size_loss_gradient", "squared_size_error"]


def _check_masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {tuple(masks.shape)}")
    return masks.bool()


def _integral(indicator: torch.Tensor) -> torch.Tensor:
    """(B, H+1, W+1) int64 summed-area table with a zero first row and column."""
    b, h, w = indicator.shape
    table = torch.zeros((b, h + 1, w + 1), dtype=torch.int64, device=indicator.device)
    table[:, 1:, 1:] = indicator.to(torch.int64).cumsum(1).cumsum(2)
    return table


def _window_sums(table: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, H, W): sum of the indicator over the (2 radius + 1)^2 window centred at every pixel,
    clipped to the image (nothing outside the image is counted)."""
    h, w = table.shape[1] - 1, table.shape[2] - 1
    dev = table.device
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    y0, y1 = (ys - radius).clamp(0, h), (ys + radius + 1).clamp(0, h)
    x0, x1 = (xs - radius).clamp(0, w), (xs + radius + 1).clamp(0, w)
    rows1, rows0 = table[:, y1], table[:, y0]
    return rows1[:, :, x1] - rows0[:, :, x1] - rows1[:, :, x0] + rows0[:, :, x0]


def chessboard_distance(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64 chessboard distance of every foreground pixel to the nearest background
    pixel (0 on background; ``max(H, W)`` everywhere when a mask has no background).

    >>> m = torch.zeros(1, 5, 5, dtype=torch.bool); m[0, 1:4, 1:4] = True
    >>> chessboard_distance(m)[0].tolist()
    [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 2, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]
    """
    masks = _check_masks(masks)
    table = _integral(~masks)
    dist = torch.zeros(masks.shape, dtype=torch.int64, device=masks.device)
    inside = masks.clone()
    for k in range(1, max(masks.shape[1:]) + 1):
        if not bool(inside.any()):
            break
        dist += inside
        inside = _window_sums(table, k) == 0  # d >= k + 1: no background within k
    return dist


def object_size(masks: torch.Tensor) -> torch.Tensor:
    """(B,) int64 size of each mask: 2 x its largest chessboard distance (0 when empty).

    >>> m = torch.zeros(2, 6, 6, dtype=torch.bool); m[0, 1:4, 1:4] = True; m[1, 2, 2] = True
    >>> object_size(m).tolist()  # a 3 x 3 square, a single pixel
    [4, 2]
    """
    return 2 * chessboard_distance(masks).flatten(1).amax(1)


def flipped_sizes(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64: the size of each mask after flipping the pixel at (y, x) alone, for every
    pixel at once (exact; cost of about two distance transforms, not one per pixel).

    Removing a foreground pixel i leaves a size >= 2k exactly when some pixel p with d(p) >= k lies
    at distance >= k from i; the pixels within distance k - 1 of ALL such p form one box (the
    intersection of squares), so each level k costs a bounding box. Adding a background pixel i
    raises the size to >= 2k exactly when some window of level k holds i as its ONLY background
    pixel; that pixel's flat index is the window sum of background indices where the count is 1.

    >>> m = torch.zeros(1, 5, 5, dtype=torch.bool); m[0, 1:4, 1:4] = True
    >>> flipped_sizes(m)[0].tolist()  # any pixel of the 3 x 3 block: the centre loses its distance 2
    [[4, 4, 4, 4, 4], [4, 2, 2, 2, 4], [4, 2, 2, 2, 4], [4, 2, 2, 2, 4], [4, 4, 4, 4, 4]]
    """
    masks = _check_masks(masks)
    b, h, w = masks.shape
    dev = masks.device
    background = ~masks
    counts_table = _integral(background)
    flat = torch.arange(h * w, device=dev, dtype=torch.int64).view(1, h, w)
    index_table = _integral(torch.zeros_like(masks, dtype=torch.int64) + flat * background)
    ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
    big = h + w + 1

    removed = torch.zeros((b, h, w), dtype=torch.int64, device=dev)  # best level after removing (y, x)
    added = torch.zeros((b, h * w), dtype=torch.int64, device=dev)  # best level after adding (y, x)
    half_size = torch.zeros(b, dtype=torch.int64, device=dev)
    for k in range(1, max(h, w) + 1):
        counts = _window_sums(counts_table, k - 1)
        level = counts == 0  # d >= k
        present = level.flatten(1).any(1)
        half_size = torch.where(present, torch.full_like(half_size, k), half_size)
        if bool(present.any()):
            rows, cols = level.any(2), level.any(1)  # (B, H), (B, W)
            ymin = torch.where(rows, ys.view(1, h), big).amin(1)
            ymax = torch.where(rows, ys.view(1, h), -big).amax(1)
            xmin = torch.where(cols, xs.view(1, w), big).amin(1)
            xmax = torch.where(cols, xs.view(1, w), -big).amax(1)
            v = lambda t: t.view(b, 1, 1)  # noqa: E731
            in_box = ((ys >= v(ymax) - (k - 1)) & (ys <= v(ymin) + (k - 1))
                      & (xs >= v(xmax) - (k - 1)) & (xs <= v(xmin) + (k - 1)))
            removed = torch.where(v(present) & ~in_box, torch.full_like(removed, k), removed)
        single = counts == 1
        if bool(single.any()):
            only = _window_sums(index_table, k - 1)
            levels = torch.where(single, torch.full_like(only, k), torch.zeros_like(only)).flatten(1)
            added.scatter_reduce_(1, torch.where(single, only, 0).flatten(1), levels, reduce="amax")
        elif not bool(present.any()):
            break  # counts only grow with k: no later level can hold a single or no background pixel
    added = torch.maximum(added.view(b, h, w), half_size.view(b, 1, 1))
    return 2 * torch.where(masks, removed, added)


def flip_candidates(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels whose flip can change the size, the object and its one-pixel
    border (every pixel when the mask is empty: any single pixel makes a size-2 object). Outside
    this set :func:`flipped_sizes` always equals the unflipped size (tested), so the estimator is
    zero there: a background pixel raises the size only as the single background pixel of a window
    around an object pixel, which makes it a neighbour of the object.

    >>> m = torch.zeros(1, 5, 5, dtype=torch.bool); m[0, 2, 2] = True
    >>> int(flip_candidates(m).sum())
    9
    """
    masks = _check_masks(masks)
    border = torch.nn.functional.max_pool2d(masks[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    empty = ~masks.flatten(1).any(1)
    return border | empty.view(-1, 1, 1)


def squared_size_error(masks: torch.Tensor, target_sizes: torch.Tensor) -> torch.Tensor:
    """(B,) float: (target size - size of the mask)^2, sizes in pixels (the paper's E).

    >>> m = torch.zeros(1, 5, 5, dtype=torch.bool); m[0, 1:4, 1:4] = True   # size 4
    >>> squared_size_error(m, torch.tensor([6])).tolist()
    [4.0]
    """
    return (target_sizes.to(torch.float32) - object_size(masks).to(torch.float32)) ** 2


def sample_masks(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli masks with P(pixel = foreground) = ``probabilities``. This IS the paper's logistic
    noise: Y = [a > Z] with Z logistic(0, 1) has P(Y = 1) = sigmoid(a) = p.

    >>> p = torch.tensor([[[0.0, 1.0, 0.5]]])
    >>> masks = sample_masks(p.expand(1000, 1, 3), torch.Generator().manual_seed(0))
    >>> masks[:, 0, 1].all().item(), masks[:, 0, 0].any().item()     # p = 1 always, p = 0 never
    (True, False)
    >>> 0.45 < masks[:, 0, 2].float().mean().item() < 0.55           # p = 0.5 about half the time
    True
    """
    uniform = torch.rand(probabilities.shape, generator=generator, device=probabilities.device,
                         dtype=probabilities.dtype)
    return uniform < probabilities


@torch.no_grad()
def size_loss_gradient(probabilities: torch.Tensor, target_sizes: torch.Tensor, samples: int = 1,
                       generator: torch.Generator | None = None, normalise: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-sample estimate of d E[l(s, g(Y))] / d p_i (seed 004, eq. 21), averaged over
    ``samples`` draws: y_i (l(y) - l(y flipped at i)) with y_i in {-1, +1} and l the squared size
    error, divided by s^2 when ``normalise`` (relative error: one weight serves objects of every
    size). Returns the gradient (B, H, W) and the mean sampled loss (B,).

    Back-propagate it through the network with ``(gradient * probabilities).sum()``.

    >>> p = torch.full((1, 4, 4), 0.5); grad, loss = size_loss_gradient(p, torch.tensor([4.0]), samples=8)
    >>> grad.shape, loss.shape
    (torch.Size([1, 4, 4]), torch.Size([1]))
    """
    if probabilities.ndim != 3 or target_sizes.shape != probabilities.shape[:1]:
        raise ValueError(f"probabilities (B, H, W) and target_sizes (B,) expected, got "
                         f"{tuple(probabilities.shape)} and {tuple(target_sizes.shape)}")
    target = target_sizes.to(device=probabilities.device, dtype=torch.float32).view(-1, 1, 1)
    scale = target.clamp_min(1.0) ** 2 if normalise else torch.ones_like(target)
    grad = torch.zeros(probabilities.shape, dtype=torch.float32, device=probabilities.device)
    loss = torch.zeros(probabilities.shape[0], dtype=torch.float32, device=probabilities.device)
    for _ in range(int(samples)):
        y = sample_masks(probabilities, generator)
        here = (target - object_size(y).view(-1, 1, 1).float()) ** 2 / scale
        flipped = (target - flipped_sizes(y).float()) ** 2 / scale
        grad += torch.where(y, 1.0, -1.0) * (here - flipped)
        loss += here.view(-1)
    return grad / samples, loss / samples
