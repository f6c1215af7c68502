"""Centre-point heatmaps (origin source B of the polar stage): targets, peaks, detection scoring,
the sigma chosen from the dataset's objects, and the trainer's loss on nnU-Net's targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_stseg.adapters.config import CentreParams
from nnunet_stseg.core.centres import (calibration_table, default_sigma, equivalent_radii, gaussian_heatmap,
                                       heatmap_peaks, heatmap_targets, match_peaks_to_objects, peak_hits)


def _disc(shape, centre, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r ** 2


def test_heatmap_target_peaks_at_each_centroid_with_the_given_sigma():
    mask = _disc((64, 80), (20, 20), 6) | _disc((64, 80), (40, 60), 9)
    heat = heatmap_targets(torch.from_numpy(mask)[None, None], sigma=3.0)
    assert heat.shape == (1, 1, 64, 80)
    h = heat[0, 0].numpy()
    assert h[20, 20] == pytest.approx(1.0) and h[40, 60] == pytest.approx(1.0)
    assert h[20, 23] == pytest.approx(np.exp(-9 / 18), rel=1e-5), "one sigma away: exp(-1/2)"
    assert h.max() <= 1.0 and h[0, 79] < 1e-6
    # maximum, not sum: two overlapping Gaussians keep 1 as their peaks
    close = gaussian_heatmap([[10, 10], [10, 13]], (20, 30), sigma=3.0)
    assert close.max().item() == pytest.approx(1.0)
    assert not heatmap_targets(torch.zeros(2, 1, 8, 8, dtype=torch.bool), 2.0).any()


def test_peaks_are_found_separated_and_ordered():
    heat = gaussian_heatmap([[20, 20], [40, 60], [10, 70]], (64, 80), sigma=3.0).numpy()
    heat[10, 70] = 0.4  # a weak third peak below the threshold
    heat = np.where(np.hypot(*np.mgrid[:64, :80] - np.array([10, 70])[:, None, None]) < 5, heat * 0.4, heat)
    peaks = heatmap_peaks(heat, min_distance=3, threshold=0.5)
    assert sorted(map(tuple, peaks.astype(int).tolist())) == [(20, 20), (40, 60)]
    assert len(heatmap_peaks(heat, min_distance=3, threshold=0.3)) == 3
    assert len(heatmap_peaks(heat, min_distance=3, threshold=0.3, max_peaks=1)) == 1
    assert heatmap_peaks(np.zeros((5, 5)), 1).shape == (0, 2)
    with pytest.raises(ValueError, match="2D"):
        heatmap_peaks(np.zeros((2, 5, 5)), 1)


def test_detection_scoring_peak_inside_the_object():
    mask = _disc((50, 50), (15, 15), 5) | _disc((50, 50), (35, 35), 5)
    m = match_peaks_to_objects([[15, 16], [16, 15], [45, 5]], mask)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1), "second peak in the same object and one on background are FPs"
    assert m["distances"] == [pytest.approx(1.0)]
    assert match_peaks_to_objects(np.zeros((0, 2)), np.zeros((5, 5))) == {"tp": 0, "fp": 0, "fn": 0, "distances": []}


def test_sigma_follows_object_size():
    small = _disc((100, 100), (50, 50), 4)
    large = _disc((100, 100), (50, 50), 40)
    r_small, r_large = equivalent_radii(small)[0], equivalent_radii(large)[0]
    assert r_small == pytest.approx(4, rel=0.1) and r_large == pytest.approx(40, rel=0.02)
    assert default_sigma(r_large) == pytest.approx(0.2 * r_large)
    assert default_sigma(r_small) == 1.0 and default_sigma(2.0) == 1.0, "never below one pixel"
    vol = np.stack([small, large])
    assert len(equivalent_radii(vol)) == 2, "objects are counted per slice"
    with pytest.raises(ValueError):
        CentreParams(sigma=0)
    assert CentreParams(sigma=3.6).peak_distance == 4 and CentreParams(sigma=3, min_distance=7).peak_distance == 7


def test_loss_uses_the_augmented_target_for_labels_and_regions():
    from nnunet_stseg.trainers.centre_trainer import HeatmapMSELoss, target_foreground

    labels = torch.zeros(2, 1, 32, 32)
    labels[0, 0, 5:12, 5:12] = 2
    labels[1, 0, 20:28, 3:9] = 1
    labels[1, 0, 0:3, 0:3] = 9  # ignore label
    fg = target_foreground(labels, has_regions=False, ignore_label=9)
    assert fg[0].sum() == 49 and fg[1].sum() == 48
    regions = torch.stack([labels[:, 0] > 0, labels[:, 0] == 2, labels[:, 0] == 9], dim=1).float()
    assert torch.equal(target_foreground(regions, has_regions=True, ignore_label=9)[0], fg[0])
    loss = HeatmapMSELoss(2.0, has_regions=False, ignore_label=9)
    perfect = heatmap_targets(fg, 2.0)
    assert loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-7)
    # relative to the heatmap's energy: predicting zeros costs O(1), not the tiny plain MSE
    zeros = loss(torch.zeros_like(perfect), labels).item()
    assert zeros == pytest.approx(perfect.pow(2).sum().item() / (perfect.pow(2).sum().item() + 0.01 * perfect.numel()))
    assert zeros > 0.5 > torch.nn.functional.mse_loss(torch.zeros_like(perfect), perfect).item() * 10
    empty = torch.zeros_like(labels)
    assert loss(torch.full_like(perfect, 0.1), empty).item() == pytest.approx(0.01 / 0.01), "no objects: same scale"


def test_focal_targets_put_exactly_one_on_the_centre_pixel_close_objects_and_border():
    """The focal loss's positives are the pixels where the target is 1: one per object, also for
    two objects closer than a few sigma and for an object cut by the image border; peaks with
    non-maximum suppression find each of them once, with its height."""
    shape = (40, 48)
    mask = _disc(shape, (12.4, 10.6), 3) | _disc(shape, (12.4, 19.6), 3) | _disc(shape, (38, 30), 4)
    heat = heatmap_targets(torch.from_numpy(mask)[None], sigma=2.0, on_pixel=True)[0, 0]
    ones = np.argwhere(heat.numpy() == 1.0)
    assert len(ones) == 3, ones
    centres = np.array([c for c in match_centres(mask)])
    np.testing.assert_array_equal(np.sort(ones, axis=0), np.sort(np.floor(centres + 0.5), axis=0))
    assert (ones[:, 0] >= 36).sum() == 1, "the border object keeps its centre inside the image"
    peaks, heights = heatmap_peaks(heat, min_distance=2, threshold=0.5, with_heights=True)
    assert sorted(map(tuple, peaks.astype(int).tolist())) == sorted(map(tuple, ones.tolist()))
    assert np.all(heights == 1.0)
    # a wider suppression distance than the objects' spacing merges the two close ones into one peak
    assert len(heatmap_peaks(heat, min_distance=12, threshold=0.5)) == 2


def match_centres(mask):
    from nnunet_stseg.core.polar import component_centroids

    return component_centroids(mask)[0]


def test_calibration_table_and_peak_hits_on_a_hand_built_heatmap():
    mask = _disc((30, 30), (8, 8), 4)
    heat = np.zeros((30, 30))
    heat[8, 8], heat[10, 10], heat[22, 22] = 0.9, 0.8, 0.35  # a hit, a second peak in the same disc, a miss
    peaks, heights = heatmap_peaks(heat, 1, threshold=0.1, with_heights=True)
    hits = peak_hits(peaks, mask)
    np.testing.assert_allclose(heights, [0.9, 0.8, 0.35], rtol=1e-6)
    assert hits.tolist() == [True, False, False]
    table = calibration_table(heights, hits, bins=(0.1, 0.5, 1.0))
    assert table == [{"low": 0.1, "high": 0.5, "peaks": 1, "hit_fraction": 0.0},
                     {"low": 0.5, "high": 1.0, "peaks": 2, "hit_fraction": 0.5}]


def test_focal_loss_trains_a_calibrated_centre_detector():
    """A small network trained with the centre model's loss (focal loss on on-pixel Gaussians, the
    output bias at CenterNet's prior) on generated discs: on new images every disc gets a peak >= 0.5
    inside it and nothing else does, and a blank image has no pixel >= 0.5 (the relative squared
    error of versions before 0.7 left peaks below 0.5 on Kvasir)."""
    from nnunet_stseg.core.lsnet import KEYPOINT_PRIOR_BIAS, focal_loss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def batch(n, objects=(1, 2)):
        images, masks = np.zeros((n, 1, 32, 32), np.float32), np.zeros((n, 32, 32), bool)
        for i in range(n):
            for _ in range(rng.integers(objects[0], objects[1] + 1)):
                masks[i] |= _disc((32, 32), rng.uniform(5, 27, 2), rng.uniform(3, 5))
            images[i, 0] = masks[i] + 0.3 * rng.normal(size=(32, 32))
        return torch.from_numpy(images), torch.from_numpy(masks)

    layers = []
    for i, d in enumerate((1, 2, 4, 1)):  # receptive field 17 px: wider than the discs
        layers += [torch.nn.Conv2d(1 if i == 0 else 16, 16, 3, padding=d, dilation=d), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Conv2d(16, 1, 1))
    torch.nn.init.constant_(net[-1].bias, KEYPOINT_PRIOR_BIAS)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        x, m = batch(8)
        loss = focal_loss(net(x), heatmap_targets(m, sigma=1.5, on_pixel=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, m = batch(16)
        prob = torch.sigmoid(net(x))[:, 0]
        blank = torch.sigmoid(net(0.3 * torch.from_numpy(rng.normal(size=(4, 1, 32, 32)).astype(np.float32))))
    tp = fp = fn = 0
    for p, mask in zip(prob, m.numpy()):
        r = match_peaks_to_objects(heatmap_peaks(p, 2, threshold=0.5), mask)
        tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
    assert tp / (tp + fn) >= 0.9 and tp / max(1, tp + fp) >= 0.9, (tp, fp, fn)
    assert float(blank.max()) < 0.5, "a blank image has no centre"
