"""The end-to-end crop-guided network (issue 19): the differentiable crop and its inverse, the box
rules, gradient through the coarse-probability channel (and only there), the thesis's
initialisation, the loss, the plan parameters; the stock-CLI run on a 3D volume set (2D stage)
here, on the shared 2D set in ``test_integration_cli.py``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_stseg.adapters.config import E2EParams, PlanOptions, StSConfig
from nnunet_stseg.core.crop_guided import (CropGuidedLoss, CropGuidedNetwork, CropGuidedOutput, box_around_all,
                                           boxes_per_object, crop_targets, downscale, fine_inputs, widen_input_weights)
from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import CropParams

CROP = CropParams(patch_size=(1, 16, 16), margin_fraction=0.125, margin_min=2)


def _unet(in_channels: int, classes: int = 2) -> PlainConvUNet:
    return PlainConvUNet(in_channels, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), 2, classes, 2, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                         deep_supervision=False)


def _network(rule: str = "all", seed: int = 0) -> CropGuidedNetwork:
    torch.manual_seed(seed)
    return CropGuidedNetwork(_unet(1), _unet(2), (16, 16), (1.0, 1.0), CROP, rule)


# ---------------------------------------------------------------------------------------------
# the crop and its inverse
# ---------------------------------------------------------------------------------------------

def test_identity_box_reproduces_the_image_and_the_coarse_map():
    image = torch.rand(2, 24, 20)
    coarse = torch.rand(24, 20)
    x = fine_inputs(image, coarse, np.array([[[0, 24], [0, 20]]]), (24, 20))
    torch.testing.assert_close(x[0, :2], image)
    torch.testing.assert_close(x[0, 2], coarse)


def test_crop_then_paste_back_returns_the_same_voxels():
    """A box of exactly the patch size maps onto the patch voxel for voxel, and the inverse map puts
    every value back on the voxel it came from (a box touching the border included)."""
    image = torch.rand(1, 40, 30)
    for box in (np.array([[[5, 21], [3, 19]]]), np.array([[[24, 40], [14, 30]]])):
        crop = fine_inputs(image, torch.zeros(5, 5), box, (16, 16))[:, :1]  # (1, 1, 16, 16)
        probs = torch.cat([1 - crop, crop], dim=1)
        fused, _ = fuse_crops(probs, box, (40, 30), mode="linear")
        (y0, y1), (x0, x1) = box[0]
        torch.testing.assert_close(fused[1, y0:y1, x0:x1], image[0, y0:y1, x0:x1])
        outside = torch.ones(40, 30, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert torch.all(fused[1][outside] == 0) and torch.all(fused[0][outside] == 1)


def test_coarse_map_is_read_at_the_same_place_as_the_image():
    """The coarse grid is 4x coarser: a box over the image's lower-right quarter reads the coarse
    map's lower-right quarter (linear: the first row and column blend with the zeros next to it)."""
    image = torch.zeros(1, 32, 32)
    coarse = torch.zeros(8, 8)
    coarse[4:, 4:] = 1.0
    x = fine_inputs(image, coarse, np.array([[[16, 32], [16, 32]]]), (8, 8))
    assert torch.all(x[0, 1, 1:, 1:] == 1.0) and float(x[0, 1, 0, 1]) == 0.75
    x = fine_inputs(image, coarse, np.array([[[0, 14], [0, 14]]]), (8, 8))
    assert torch.all(x[0, 1] == 0.0)


def test_downscale_is_antialiased():
    """A one-pixel checkerboard averages out instead of aliasing into a pattern."""
    board = (torch.arange(64)[:, None] + torch.arange(64)[None]) % 2
    small = downscale(board[None, None].float(), (16, 16))
    assert small.shape == (1, 1, 16, 16)
    assert float(small.std()) < 0.01 and abs(float(small.mean()) - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------
# box rules
# ---------------------------------------------------------------------------------------------

def test_box_around_all_empty_single_and_scattered():
    empty = np.zeros((8, 8), bool)
    assert box_around_all(empty, (64, 48), (1.0, 1.0), CROP).tolist() == [[[0, 64], [0, 48]]]
    single = empty.copy()
    single[3:5, 2:4] = True  # image rows [24, 40), cols [12, 24): 16 x 12 px, margin max(2, 2) = 2
    assert box_around_all(single, (64, 48), (1.0, 1.0), CROP).tolist() == [[[22, 42], [10, 26]]]
    scattered = empty.copy()
    scattered[0, 0] = scattered[7, 7] = True  # the two corners: one box over everything, clipped
    assert box_around_all(scattered, (64, 48), (1.0, 1.0), CROP).tolist() == [[[0, 64], [0, 48]]]
    corner = empty.copy()
    corner[7, 6:] = True  # touches the border: clipped, not shifted
    box = box_around_all(corner, (64, 48), (1.0, 1.0), CROP)[0]
    assert box[0, 1] == 64 and box[1, 1] == 48 and box[0, 0] == 56 - 2 and box[1, 0] == 36 - 2


def test_boxes_per_object_are_the_cascades():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = mask[5:7, 5:7] = True
    boxes = boxes_per_object(mask, (64, 64), (1.0, 1.0), CROP)
    assert len(boxes) == 2
    assert all((b[:, 1] - b[:, 0]).tolist() == [20, 20] for b in boxes)  # 16 px squared + 2 x margin 2
    assert boxes_per_object(np.zeros((8, 8), bool), (64, 64), (1.0, 1.0), CROP).tolist() == [[[0, 64], [0, 64]]]
    speck = np.zeros((32, 32), bool)
    speck[3, 3] = True  # 2 px at full resolution: below the 5 px size rule -> the whole image
    assert boxes_per_object(speck, (64, 64), (1.0, 1.0), CROP).tolist() == [[[0, 64], [0, 64]]]


def test_training_mode_takes_one_box_per_image_eval_all():
    net = _network("objects")
    with torch.no_grad():  # make the coarse module say "foreground" in two separate places
        for p in net.coarse.parameters():
            p.zero_()
        net.coarse.decoder.seg_layers[-1].bias.copy_(torch.tensor([0.0, -5.0]))
    image = torch.zeros(1, 1, 64, 64)
    net.eval()
    assert len(net(image).boxes[0]) == 1  # nothing found: the whole image
    net.coarse = _BlobNet(((2, 2), (12, 12)))
    out = net(image)
    assert len(out.boxes[0]) == 2 and out.fine.shape[0] == 2
    net.train()
    out = net(image)
    assert len(out.boxes[0]) == 1 and out.fine.shape[0] == 1


class _BlobNet(nn.Module):
    """A 'coarse module' that says foreground in 2 x 2 blobs at fixed places of its 16 x 16 output."""

    def __init__(self, corners):
        super().__init__()
        self.corners = corners
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 0] = 5.0
        for y, x0 in self.corners:
            logits[:, 0, y:y + 2, x0:x0 + 2] = -5.0
        return logits * self.scale


# ---------------------------------------------------------------------------------------------
# gradient, initialisation, loss
# ---------------------------------------------------------------------------------------------

def test_fine_loss_reaches_the_coarse_module_through_the_probability_channel():
    net = _network()
    image = torch.rand(2, 1, 48, 48)
    out = net(image)
    loss = CropGuidedLoss(lambda logits, label: logits.softmax(1)[:, 1].mean(), coarse_weight=0.0)
    loss(out, torch.zeros(2, 1, 48, 48)).backward()
    coarse_grads = [p.grad for p in net.coarse.parameters() if p.grad is not None]
    assert coarse_grads and max(float(g.abs().max()) for g in coarse_grads) > 0


def test_detached_channel_would_stop_the_gradient():
    """The same step with the coarse map detached leaves the coarse module without gradient: the
    previous test fails if the channel is ever detached."""
    net = _network()
    image = torch.rand(2, 1, 48, 48)
    coarse_logits = net.coarse(downscale(image, net.module_size))
    fg, mask = net.foreground(coarse_logits)
    x = torch.cat([fine_inputs(image[b], fg[b].detach(), box_around_all(mask[b], (48, 48), (1.0, 1.0), CROP),
                               (16, 16)) for b in range(2)])
    net.fine(x).softmax(1)[:, 1].mean().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in net.coarse.parameters())


def test_initialisation_equals_the_pretrained_network():
    torch.manual_seed(1)
    pretrained = _unet(1)
    net = _network(seed=2)
    net.init_from_pretrained(pretrained.state_dict())
    net.eval(), pretrained.eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.coarse(x), pretrained(x))
        for channel in (torch.zeros(3, 1, 16, 16), torch.rand(3, 1, 16, 16)):  # whatever the coarse map holds
            torch.testing.assert_close(net.fine(torch.cat([x, channel], 1)), pretrained(x))


def test_widening_refuses_another_architecture():
    with pytest.raises(ValueError, match="has shape"):
        widen_input_weights(nn.Conv2d(2, 3, 3).state_dict(), nn.Conv2d(3, 4, 3))
    with pytest.raises(KeyError, match="no 'bias'"):
        widen_input_weights({"weight": torch.zeros(3, 2, 1, 1)}, nn.Conv2d(3, 3, 1))


def test_loss_weights_and_targets():
    labels = torch.zeros(1, 1, 32, 32)
    labels[0, 0, 8:16, 8:16] = 1
    boxes = [np.array([[[8, 16], [8, 16]]])]
    assert torch.all(crop_targets(labels, boxes, (4, 4)) == 1)  # the box holds only the object
    seen = []

    def record(logits, label):
        seen.append(tuple(label.shape))
        return label.float().mean()

    out = CropGuidedOutput(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4), boxes)
    total = CropGuidedLoss(record, coarse_weight=2.0, fine_weight=0.5)(out, labels)
    assert seen == [(1, 1, 4, 4), (1, 1, 8, 8)]
    assert float(total) == pytest.approx(0.5 * 1.0 + 2.0 * (64 / 1024))
    seen.clear()
    CropGuidedLoss(record, coarse_weight=0.0)(out, labels)
    assert seen == [(1, 1, 4, 4)]  # weight 0: the coarse term is not even computed


# ---------------------------------------------------------------------------------------------
# plan parameters
# ---------------------------------------------------------------------------------------------

def test_e2e_block_is_checked():
    assert E2EParams.from_configuration({}).box_rule == "all"
    with pytest.raises(ValueError, match="box_rule must be one of"):
        E2EParams.from_configuration({"sts_e2e": {"box_rule": "largest"}}, "configuration 'x'")
    with pytest.raises(ValueError, match="unknown sts.e2e parameters"):
        E2EParams.from_configuration({"sts_e2e": {"margin": 3}}, "configuration 'x'")  # plans before 0.9
    with pytest.raises(ValueError, match=r"configuration 'x': unknown sts\.e2e parameters \['margin'\]"):
        E2EParams.from_configuration({"sts": {"e2e": {"margin": 3}}}, "configuration 'x'")
    with pytest.raises(ValueError, match="coarse_loss_weight >= 0"):
        E2EParams(coarse_loss_weight=-1)
    with pytest.raises(ValueError, match="no depth channel"):
        from nnunet_stseg.planners.sts_planner import add_sts_configurations
        add_sts_configurations(None, {"configurations": {"2d": {}}, "dataset_name": "x"},
                               PlanOptions(input_size=32, e2e=True, depth_channel=True))


def test_e2e_configuration_is_a_fine_copy_with_its_own_role():
    from nnunet_stseg.planners.sts_planner import e2e_configuration

    fine = {"patch_size": [32, 32], "sts": StSConfig("fine", 32, "2d_sts_coarse_32", crop=CropParams((1, 32, 32))
                                                      ).to_dict()}
    cfg = e2e_configuration(fine, {"box_rule": "objects"})
    assert cfg["sts"]["role"] == "e2e" and fine["sts"]["role"] == "fine"
    assert cfg["sts"]["e2e"]["box_rule"] == "objects" and "sts_e2e" not in cfg
    assert StSConfig.from_configuration(cfg).e2e == E2EParams(box_rule="objects")
    assert StSConfig.from_configuration(cfg).crop == CropParams((1, 32, 32))
    json.dumps(cfg)  # plans stay JSON


# ---------------------------------------------------------------------------------------------
# the stock commands on 3D volumes (a 2D model, slice by slice)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stock_commands_on_volumes(tmp_path):
    import SimpleITK as sitk

    from nnunet_stseg.commands.pipeline import (pipeline_env, plan_command_line, predict_command_line, run,
                                                train_command_line)
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    env = pipeline_env(tmp_path, 1, 3, 1)
    ds = make_synthetic_dataset(env["nnUNet_raw"], 989, "E2EVolumes", dim=3, n_train=5, n_test=1, num_classes=2,
                                seed=1)
    logs = tmp_path / "logs"
    logs.mkdir()
    run(plan_command_line(989, 32, ("2d",), 8, "--e2e", "--set", "e2e.box_rule=objects", processes=1),
        env, logs / "plan.log")
    run(train_command_line(989, "2d_sts_coarse_32", 0, "nnUNetTrainer_StSCoarse"),
        {**env, "STSEG_SKIP_VALIDATION": "1"}, logs / "coarse.log")
    run(train_command_line(989, "2d_sts_e2e_32", 0, "nnUNetTrainer_StSEndToEnd"), env, logs / "e2e.log")
    log = (logs / "e2e.log").read_text()
    assert "box rule 'objects'" in log and "both modules initialised from the coarse model" in log
    summary = json.loads(next((tmp_path / "nnUNet_results").rglob("validation/summary.json")).read_text())
    assert "Precision" in summary["foreground_mean"] and "Recall" in summary["foreground_mean"]
    out = tmp_path / "pred"
    run(predict_command_line(ds / "imagesTs", out, 989, "2d_sts_e2e_32", "nnUNetTrainer_StSEndToEnd", [0], "cpu",
                             "--disable_tta", "-npp", "0", "-nps", "0"), env, logs / "predict.log")
    for f in sorted((ds / "imagesTs").glob("*_0000.nii.gz")):
        img, pred = sitk.ReadImage(str(f)), sitk.ReadImage(str(out / f.name.replace("_0000", "")))
        assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
               (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}
    # a fine configuration is refused with the command that makes the right one
    wrong = (r"configuration '2d_sts_fine_32' is the fine configuration \(trained with nnUNetTrainer_StSFine\); "
             r"nnUNetTrainer_StSEndToEnd needs an e2e configuration \(`nnunet-stseg plan --e2e` adds it\)")
    with pytest.raises(RuntimeError, match=wrong):
        run(train_command_line(989, "2d_sts_fine_32", 0, "nnUNetTrainer_StSEndToEnd"), env, logs / "wrong.log")


# ---------------------------------------------------------------------------------------------
# the predictor: folds, mirroring, the device, the objects report (a stand-in model with known boxes)
# ---------------------------------------------------------------------------------------------

def test_e2e_case_that_does_not_fit_on_the_device_is_predicted_again_on_the_cpu(planned_boxes, monkeypatch, capsys):
    from stand_ins import assert_retried_on_the_cpu, crop_guided_predictor

    p, _, data = crop_guided_predictor(*planned_boxes, "e2e", [[4, 20], [6, 22]])
    assert_retried_on_the_cpu(monkeypatch, capsys, p, data)


def test_e2e_folds_and_whole_case_mirroring(planned_boxes):
    """One fold's weights are loaded once for every case; two folds are each loaded per case and
    averaged; the whole case is mirrored over every subset of the in-plane axes (4 passes)."""
    from stand_ins import crop_guided_predictor

    p, net, data = crop_guided_predictor(*planned_boxes, "e2e", [[4, 20], [6, 22]])
    loads = []
    real_load = net.load_state_dict
    net.load_state_dict = lambda state, *a, **k: loads.append(state) or real_load(state, *a, **k)
    p.predict_logits_from_preprocessed_data(data)
    p.predict_logits_from_preprocessed_data(data)
    assert len(loads) == 1 and p.last_timings["passes"] == 4
    p.list_of_parameters = [{"scale": torch.tensor(1.0)}, {"scale": torch.tensor(0.0)}]
    loads.clear()
    two = p.predict_logits_from_preprocessed_data(data)
    p.predict_logits_from_preprocessed_data(data)
    assert len(loads) == 4 and p.last_timings["passes"] == 8
    p.list_of_parameters = [{"scale": torch.tensor(0.0)}]
    zero = p.predict_logits_from_preprocessed_data(data)
    p.list_of_parameters = [{"scale": torch.tensor(1.0)}]
    one = p.predict_logits_from_preprocessed_data(data)
    assert not torch.equal(two, one) and not torch.equal(two, zero)
    p.use_mirroring = False
    p.predict_logits_from_preprocessed_data(data)
    assert p.last_timings["passes"] == 1


def test_e2e_objects_report_has_each_slices_box(planned_boxes):
    """One object per box the model used (per slice), with the foreground inside it; a case
    without any box reports none and the ``background`` fallback; ``objects_report: false`` none."""
    from stand_ins import crop_guided_predictor

    p, _, data = crop_guided_predictor(*planned_boxes, "e2e", [[4, 20], [6, 22]])
    p.use_mirroring = False
    p.predict_logits_from_preprocessed_data(data)
    report = p.last_objects
    assert report["n_objects"] == 2 and report["fallback"] is None and report["n_passes"] == 1
    assert [o["box"]["start"] for o in report["objects"]] == [[1, 4, 6], [2, 4, 6]]
    assert [o["box"]["stop"] for o in report["objects"]] == [[2, 20, 22], [3, 20, 22]]
    pixel = float(np.prod(p.configuration_manager.spacing[-2:]))
    # the square inside the box (a 2D configuration's slice axis counts 1 mm)
    assert [o["volume_mm3"] for o in report["objects"]] == [round(12 * 14 * pixel, 3)] * 2
    p.predict_logits_from_preprocessed_data(torch.zeros_like(data))
    assert p.last_objects["n_objects"] == 0 and p.last_objects["fallback"] == "background"
    p, _, data = crop_guided_predictor(*planned_boxes, "e2e", [[4, 20], [6, 22]], objects_report=False)
    p.predict_logits_from_preprocessed_data(data)
    assert p.last_objects is None


@pytest.mark.parametrize("kind", ["e2e", "lsnet"])
def test_per_run_overrides_reach_what_the_model_uses_and_name_the_rest(planned_boxes, monkeypatch, capsys, kind):
    """``STSEG_OVERRIDES`` for one run: the end-to-end model takes the box rule's crop keys, both
    models the report switch; keys a model does not use are named in the log and not recorded."""
    from stand_ins import crop_guided_predictor

    monkeypatch.setenv("STSEG_OVERRIDES", "crop.margin_fraction=0.3,objects_report=0,polar.max_origins=1")
    p, net, data = crop_guided_predictor(*planned_boxes, kind, [[4, 20], [6, 22]])
    net.crop = None  # the stand-in's boxes are fixed; the real end-to-end network reads its box rule here
    p.use_mirroring = False
    p.predict_logits_from_preprocessed_data(data)
    assert p.last_objects is None  # objects_report=0 applied
    log = capsys.readouterr().out
    ignored = ["sts.polar.max_origins"] if kind == "e2e" else ["sts.crop.margin_fraction", "sts.polar.max_origins"]
    assert f"does not use (ignored): {', '.join(k.removeprefix('sts.') for k in ignored)}" in log, log
    recorded = {"sts.objects_report"} | ({"sts.crop.margin_fraction"} if kind == "e2e" else set())
    assert set(p.applied_overrides) == recorded
    assert (p.sts.crop.margin_fraction == 0.3) == (kind == "e2e")
    assert (net.crop is not None and net.crop.margin_fraction == 0.3) == (kind == "e2e")
    monkeypatch.setenv("STSEG_OVERRIDES", "crop.margin_fractio=0.3")
    p, _, data = crop_guided_predictor(*planned_boxes, kind, [[4, 20], [6, 22]])
    with pytest.raises(ValueError, match="unknown key 'crop.margin_fractio'"):
        p.predict_logits_from_preprocessed_data(data)
