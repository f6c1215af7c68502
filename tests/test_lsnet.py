"""L-SNet's pieces (issue 20): targets, losses, keypoints, the RoI map and its inverse, gamma."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import crop_and_resample
from nnunet_stseg.core.lsnet import (LocalisationLoss, LocalisationNetwork, LSNet, best_box_iou, boxes_at_keypoints,
                                     diou_loss, focal_loss, keypoints, localisation_targets, scale_gradient,
                                     top_keypoints)


def test_targets_of_two_objects_one_at_the_border():
    fg = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    fg[0, 0, 0:4, 0:6] = True  # touches the top and left border; centre (2, 3)
    fg[0, 0, 8:16, 10:16] = True  # touches the bottom and right border; centre (12, 13)
    t = localisation_targets(fg, stride=4, sigma=1.0)
    assert t.heatmap.shape == (1, 1, 4, 4) and t.distances.shape == (1, 4, 4, 4)
    peaks = torch.nonzero(t.heatmap[0, 0] == 1).tolist()
    assert peaks == [[0, 0], [3, 3]]  # the cells holding each box centre
    # distances (cells) from the cell centres (2, 2) and (14, 14) px to each box's edges
    assert t.distances[0, :, 0, 0].tolist() == [0.5, 0.5, 0.5, 1.0]
    assert t.distances[0, :, 3, 3].tolist() == [1.5, 0.5, 1.0, 0.5]
    # the box each cell regresses reproduces the object's box exactly
    for cell, truth in (((0, 0), [[0, 4], [0, 6]]), ((3, 3), [[8, 16], [10, 16]])):
        box = boxes_at_keypoints(np.array([cell]), t.distances[0], 4, 0.0, (16, 16), (16, 16))[0]
        assert box.tolist() == truth
    assert bool(t.positive[0, 0, 0, 0]) and not bool(t.positive[0, 0, 0, 3])
    assert [b.tolist() for b in t.boxes] == [[[[0, 4], [0, 6]], [[8, 16], [10, 16]]]]


def test_an_empty_image_has_a_zero_target_and_no_positive_cell():
    t = localisation_targets(torch.zeros(2, 8, 8, dtype=torch.bool), stride=2, sigma=1.0)
    assert float(t.heatmap.sum()) == 0 and not bool(t.positive.any()) and [len(b) for b in t.boxes] == [0, 0]


def test_focal_loss_prefers_the_peak_and_is_reduced_near_it():
    target = torch.tensor([[0.0, 0.5, 1.0, 0.5, 0.0]])
    peak = torch.tensor([[-5.0, -5.0, 5.0, -5.0, -5.0]])
    assert float(focal_loss(peak, target)) < 0.01
    # a false high value next to the centre costs less than the same value far from it
    near = peak.clone(); near[0, 1] = 2.0
    far = peak.clone(); far[0, 4] = 2.0
    assert float(focal_loss(near, target)) < float(focal_loss(far, target))
    # normalised by the number of centres: two copies of the same map give the same loss
    assert torch.isclose(focal_loss(torch.cat([far, far]), torch.cat([target, target])), focal_loss(far, target))


def test_diou_loss_is_zero_for_the_same_box_and_counts_only_positive_cells():
    t = torch.full((1, 4, 2, 2), 2.0)
    p = t.clone(); p[0, :, 1, 1] = torch.tensor([0.1, 5.0, 0.1, 5.0])  # a wrong box at a negative cell
    pos = torch.zeros(1, 1, 2, 2, dtype=torch.bool); pos[0, 0, 0, 0] = True
    assert float(diou_loss(p, t, pos)) == 0.0
    pos[0, 0, 1, 1] = True
    # box (-0.1..5, -0.1..5) vs (-2..2, -2..2): IoU 2.1^2 / (5.1^2 + 16 - 2.1^2), centre offset 2.45 per axis
    iou = 2.1 ** 2 / (5.1 ** 2 + 16 - 2.1 ** 2)
    expected = (1 - iou + 2 * 2.45 ** 2 / (2 * 7 ** 2)) / 2
    assert float(diou_loss(p, t, pos)) == pytest.approx(expected, rel=1e-5)
    assert float(diou_loss(p, t, torch.zeros_like(pos))) == 0.0


def test_keypoints_one_per_component_at_its_peak_and_top_k_for_training():
    h = torch.zeros(8, 8)
    h[1, 1], h[1, 2], h[2, 2] = 0.6, 0.95, 0.7  # one component, peak (1, 2)
    h[6, 6] = 0.8
    h[4, 0] = 0.4  # below the threshold
    cells, scores = keypoints(h, 0.5)
    assert cells.tolist() == [[1, 2], [6, 6]] and np.allclose(scores, [0.95, 0.8])
    assert top_keypoints(h, 3).tolist() == [[1, 2], [6, 6], [4, 0]]
    assert keypoints(torch.zeros(4, 4), 0.5)[0].shape == (0, 2)


def test_a_box_maps_onto_the_whole_patch_and_back_onto_the_same_voxels():
    image = torch.zeros(1, 32, 32)
    image[0, 8:20, 4:28] = 1.0
    box = torch.tensor([[[8.0, 20.0], [4.0, 28.0]]])
    crop = crop_and_resample(image, box, (16, 16), "nearest")
    assert bool(torch.all(crop == 1.0))  # the box fills the patch
    wider = crop_and_resample(image, box + torch.tensor([-1.0, 1.0]), (16, 16), "nearest")
    assert float(wider.min()) == 0.0  # one pixel more on each side reaches the background
    probs = torch.cat([1 - crop, crop], dim=1)  # (1, 2, 16, 16): all foreground
    fused, covered = fuse_crops(probs, box.numpy().astype(np.float64), (32, 32))
    assert torch.equal(fused.argmax(0).bool(), image[0].bool())  # back onto exactly the box's voxels
    # a fractional box reaching outside the image pastes onto the voxels it covers inside it
    frac = np.array([[[-3.5, 10.25], [20.0, 40.0]]])
    fused, covered = fuse_crops(probs, frac, (32, 32))
    assert covered.nonzero().min(0).values.tolist() == [0, 20] and covered.nonzero().max(0).values.tolist() == [10, 31]


def test_the_crop_is_differentiable_in_the_box():
    image = torch.linspace(0, 1, 32)[None, None].expand(1, 32, 32).contiguous()  # rises along x
    box = torch.tensor([[[4.0, 20.0], [4.0, 20.0]]], requires_grad=True)
    crop_and_resample(image, box, (8, 8), "linear").sum().backward()
    assert box.grad is not None and box.grad[0, 1].abs().sum() > 0  # moving the x edges changes the crop
    assert float(box.grad[0, 0].abs().sum()) < 1e-4  # the image is constant along y


def _tiny_lsnet(gamma: float) -> LSNet:
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 4, stride=4))
    locator = LocalisationNetwork(features, 4, 4)
    with torch.no_grad():  # a confident keypoint somewhere, boxes of a few cells
        locator.heads.keypoint[-1].bias.fill_(3.0)
    segmenter = nn.Conv2d(1, 2, 3, padding=1)
    return LSNet(locator, segmenter, (16, 16), (8, 8), out_channels=2, gamma=gamma)


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_gamma_scales_the_segmentation_gradient_into_l_net(gamma):
    """gamma 0: the S-Net loss leaves L-Net without gradient (an optimiser step does not move it);
    gamma > 0: L-Net's box head gets exactly gamma times the gradient it gets at gamma 1."""
    image = torch.rand(2, 1, 32, 32)

    def grads(g: float) -> tuple[LSNet, dict]:
        net = _tiny_lsnet(g).train()
        np.random.seed(0)
        out = net(image)
        out.fine[:, 1].mean().backward()
        return net, {k: p.grad for k, p in net.locator.named_parameters()}

    net, g = grads(gamma)
    assert all(v is not None for k, v in net.segmenter.named_parameters())
    if gamma == 0:
        assert all(v is None for v in g.values())
        before = {k: p.detach().clone() for k, p in net.locator.named_parameters()}
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3).step()
        assert all(torch.equal(before[k], p) for k, p in net.locator.named_parameters())
    else:
        _, full = grads(1.0)
        box = [k for k in g if k.startswith("heads.box")]
        assert box and any(float(g[k].abs().sum()) > 0 for k in box)
        for k in box:
            assert torch.allclose(g[k], gamma * full[k], atol=1e-7)
        assert all(g[k] is None for k in g if k.startswith("heads.keypoint"))  # the keypoint is a hard choice


def test_scale_gradient_keeps_the_value():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    assert torch.equal(scale_gradient(x, 0.3), x) and torch.equal(scale_gradient(x, 0.0), x)


def test_eval_forward_fallbacks():
    net = _tiny_lsnet(0.1).eval()
    with torch.no_grad():
        net.locator.heads.keypoint[-1].bias.fill_(-20.0)  # no keypoint anywhere
    image = torch.rand(1, 1, 32, 32)
    assert net(image).fine.shape == (0, 2, 8, 8) and net.last_fallbacks == 1
    net.fallback = "whole"
    assert net(image).boxes[0].tolist() == [[[0.0, 32.0], [0.0, 32.0]]]
    net.fallback = "best"
    assert net(image).fine.shape[0] == 1


def test_localisation_loss_learns_a_box():
    """A few steps of L-Net's loss on one image move its heatmap peak and box to the object."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 2, stride=2), nn.ReLU())
    net = LocalisationNetwork(features, 8, 2)
    image = torch.zeros(1, 1, 16, 16); image[0, 0, 4:10, 6:12] = 1
    fg = image > 0
    loss_fn = LocalisationLoss(sigma=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad(); loss = loss_fn(net(image), fg, 2); loss.backward(); opt.step()
    out = net(image)
    cells, _ = keypoints(torch.sigmoid(out.heatmap[0, 0]), 0.5)
    assert len(cells) == 1
    box = boxes_at_keypoints(cells[:1], out.distances[0].detach(), 2, 0.0, (16, 16), (16, 16)).numpy()
    assert best_box_iou(box, np.array([[[4, 10], [6, 12]]]))[0] > 0.7


# ---------------------------------------------------------------------------------------------
# plan parameters
# ---------------------------------------------------------------------------------------------

def test_lsnet_block_is_checked():
    from nnunet_stseg.adapters.config import LSNetParams, PlanOptions

    params = LSNetParams.from_configuration({})
    assert (params.gamma, params.threshold, params.top_k, params.fallback) == (0.1, 0.5, 3, "empty")
    assert params.margin_fraction == pytest.approx(15 / 512, abs=1e-4)
    with pytest.raises(ValueError, match="fallback must be one of"):
        LSNetParams.from_configuration({"sts_lsnet": {"fallback": "coarse"}}, "configuration 'x'")
    with pytest.raises(ValueError, match="unknown sts.lsnet parameters"):
        LSNetParams.from_configuration({"sts_lsnet": {"margin": 15}}, "configuration 'x'")
    with pytest.raises(ValueError, match="0 <= gamma <= 1"):
        LSNetParams(gamma=2.0)
    with pytest.raises(ValueError, match="no depth channel"):
        from nnunet_stseg.planners.sts_planner import add_sts_configurations
        add_sts_configurations(None, {"configurations": {"2d": {}}, "dataset_name": "x"},
                               PlanOptions(input_size=32, lsnet=True, depth_channel=True))


def test_lsnet_configuration_is_a_fine_copy_with_its_own_role():
    import json

    from nnunet_stseg.adapters.config import StSConfig, trainer_for_role
    from nnunet_stseg.core.geometry import CropParams
    from nnunet_stseg.planners.sts_planner import lsnet_configuration

    fine = {"patch_size": [32, 32], "sts": StSConfig("fine", 32, "2d_sts_coarse_32", crop=CropParams((1, 32, 32))
                                                      ).to_dict()}
    cfg = lsnet_configuration(fine, {"gamma": 0.0})
    assert cfg["sts"]["role"] == "lsnet" and fine["sts"]["role"] == "fine" and cfg["sts"]["lsnet"]["gamma"] == 0.0
    assert trainer_for_role(cfg["sts"]) == "nnUNetTrainer_StSLSNet"
    json.dumps(cfg)  # plans stay JSON


# ---------------------------------------------------------------------------------------------
# the predictor (the end-to-end model's, with L-SNet's fractional RoIs and its fallback)
# ---------------------------------------------------------------------------------------------

def test_lsnet_case_that_does_not_fit_on_the_device_is_predicted_again_on_the_cpu(planned_boxes, monkeypatch, capsys):
    from stand_ins import assert_retried_on_the_cpu, crop_guided_predictor

    p, _, data = crop_guided_predictor(*planned_boxes, "lsnet", [[3.5, 19.5], [5.25, 21.75]])
    assert_retried_on_the_cpu(monkeypatch, capsys, p, data)


def test_lsnet_objects_report_has_each_slices_roi_and_the_fallback(planned_boxes):
    """One object per RoI (fractional: the voxels it touches), per slice; the slice without a
    keypoint is counted and names L-SNet's fallback."""
    from stand_ins import crop_guided_predictor

    p, _, data = crop_guided_predictor(*planned_boxes, "lsnet", [[3.5, 19.5], [5.25, 21.75]])
    p.predict_logits_from_preprocessed_data(data)
    report = p.last_objects
    assert report["n_objects"] == 2 and report["fallback"] == "empty" and report["n_passes"] == 4
    assert report["n_slice_passes_without_keypoint"] == 4  # slice 0 in each of the 4 mirrored passes
    assert [o["box"]["start"] for o in report["objects"]] == [[1, 3, 5], [2, 3, 5]]
    assert [o["box"]["stop"] for o in report["objects"]] == [[2, 20, 22], [3, 20, 22]]
    assert report["model"].endswith("lsnet")
