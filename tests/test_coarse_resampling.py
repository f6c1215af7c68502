"""The coarse grid: one resampling function for the coarse model's training data and its input at
prediction (``sts.coarse_resampling``), on the network's device.

The planned datasets of conftest (2D: 981; 3D anisotropic: 982, with a 2d and a 3d pipeline) are
preprocessed by ``nnunet-stseg plan``; the fine configurations' data is the full-resolution grid the
predictor receives, so the coarse training case must equal what the predictor makes of the fine
case, to float rounding.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from nnunet_stseg.adapters.config import StSConfig, coarse_config_name, fine_config_name
from nnunet_stseg.adapters.inference_io import COARSE_RESAMPLING_KEY, PluginConfigurationManager, antialiased_resampling
from nnunet_stseg.core.geometry import resample_image

# ----------------------------------------------------------------------------------------------
# the function (pure torch)
# ----------------------------------------------------------------------------------------------

def test_every_pixel_reaches_the_coarse_grid_and_the_mean_is_kept():
    """Antialiased: a lone bright pixel anywhere shows in the coarse image (plain interpolation
    reads 4 of every 16 x 16 pixels and misses the others), with its share of the mass away from the
    border (a triangle filter renormalised where it reaches outside the image: less or more there),
    and the mean intensity of an image is kept."""
    for y, x in ((0, 0), (7, 9), (63, 62), (32, 17), (40, 40), (20, 44)):
        image = torch.zeros(1, 1, 64, 64)
        image[0, 0, y, x] = 1.0
        mass = float(resample_image(image, (1, 4, 4)).sum()) * 16 * 16
        interior = min(y, x, 63 - y, 63 - x) >= 16
        assert (0.9 < mass < 1.1) if interior else (0.3 < mass < 1.3), (y, x, mass)
    rng = np.random.default_rng(0)
    noisy = rng.normal(3.0, 1.0, (2, 1, 128, 96)).astype(np.float32)
    out = resample_image(noisy, (1, 32, 24))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 1, 32, 24)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), noisy.mean(axis=(1, 2, 3)), atol=0.02)
    assert out.std() < noisy.std() / 4  # 16 pixels averaged per output pixel: the noise goes down


def test_volumes_are_averaged_in_3d_and_stay_on_their_device():
    volume = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 8, 8, 8)
    out = resample_image(volume, (4, 4, 4))
    assert out.device == volume.device and out.shape == (1, 4, 4, 4)
    # area averaging: each output voxel is the mean of its 2 x 2 x 2 block
    np.testing.assert_allclose(out[0, 0, 0, 0].item(), volume[0, :2, :2, :2].mean().item())
    assert resample_image(volume, (8, 8, 8)) is not None and torch.equal(resample_image(volume, (8, 8, 8)), volume)


# ----------------------------------------------------------------------------------------------
# plans and nnU-Net's configuration manager
# ----------------------------------------------------------------------------------------------

def test_new_plans_say_antialiased_and_old_blocks_read_as_nnunet(planned_2d):
    configs = planned_2d.plans["configurations"]
    coarse = configs[coarse_config_name("2d", planned_2d.size)]
    assert coarse["sts"]["coarse_resampling"] == "antialiased"
    assert "coarse_resampling" not in configs[fine_config_name("2d", planned_2d.size)]["sts"]
    old = dict(coarse["sts"])
    del old["coarse_resampling"]
    assert StSConfig.from_configuration({"sts": old}).coarse_resampling == "nnunet"
    with pytest.raises(ValueError, match="sts.coarse_resampling must be one of"):
        StSConfig.from_configuration({"sts": {**old, "coarse_resampling": "bicubic"}})


def test_the_configuration_manager_hands_nnunet_the_planned_function(planned_2d):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    coarse = planned_2d.plans["configurations"][coarse_config_name("2d", planned_2d.size)]
    assert PluginConfigurationManager(coarse).resampling_fn_data is antialiased_resampling
    old = copy.deepcopy(coarse)
    old["sts"]["coarse_resampling"] = "nnunet"
    nnunet_fn = PluginConfigurationManager(old).resampling_fn_data
    assert nnunet_fn is not antialiased_resampling
    assert nnunet_fn.func is ConfigurationManager(old).resampling_fn_data.func
    fine = planned_2d.plans["configurations"][fine_config_name("2d", planned_2d.size)]
    assert PluginConfigurationManager(fine).resampling_fn_data is not antialiased_resampling


# ----------------------------------------------------------------------------------------------
# training data == prediction input
# ----------------------------------------------------------------------------------------------

def _cases(folder):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ds = infer_dataset_class(str(folder))(str(folder))
    for key in ds.identifiers:
        data, _, _, props = ds.load_case(key)
        yield key, np.asarray(data), props


def _predictor(planned, dim: str):
    """Our cascade predictor on the planned configurations (tiny random networks: only the coarse
    input is used here)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.predictor import StSPredictor

    pm = PlansManager(copy.deepcopy(planned.plans))
    lm = pm.get_label_manager(planned.dataset_json)

    def make(cls, config):
        cm = pm.get_configuration(config)
        net = nnUNetTrainer.build_network_architecture(pm, cm, 1, lm.num_segmentation_heads, False)
        p = cls(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
        p.manual_initialization(net, pm, cm, [net.state_dict()], planned.dataset_json, "nnUNetTrainer", None)
        return p

    cascade = make(StSPredictor, fine_config_name(dim, planned.size))
    cascade.coarse = make(nnUNetPredictor, coarse_config_name(dim, planned.size))
    return cascade


@pytest.mark.parametrize("which", ["2d of a 2D dataset", "2d of a 3D dataset", "3d"])
def test_the_coarse_model_trains_on_exactly_what_the_predictor_gives_it(planned_2d, planned_3d, which):
    """Each coarse training case (preprocessed by ``nnunet-stseg plan``) equals the predictor's
    coarse input made from the same case on the full-resolution grid: the coarse model is trained on
    the images it will see. The cases record the resampling."""
    planned, dim = {"2d of a 2D dataset": (planned_2d, "2d"), "2d of a 3D dataset": (planned_3d, "2d"),
                    "3d": (planned_3d, "3d")}[which]
    configs = planned.plans["configurations"]
    fine_folder = planned.preprocessed_folder / configs[fine_config_name(dim, planned.size)]["data_identifier"]
    coarse_folder = planned.preprocessed_folder / configs[coarse_config_name(dim, planned.size)]["data_identifier"]
    fine_cases = {key: data for key, data, _ in _cases(fine_folder)}
    cascade = _predictor(planned, dim)
    n = 0
    for key, coarse_data, props in _cases(coarse_folder):
        assert props[COARSE_RESAMPLING_KEY] == "antialiased"
        made = cascade._coarse_input(torch.from_numpy(fine_cases[key]))
        cascade.__dict__.pop("_case_memo")
        assert tuple(made.shape) == coarse_data.shape, key
        np.testing.assert_allclose(made.numpy(), coarse_data, atol=1e-5, err_msg=key)
        if dim == "2d" and coarse_data.shape[1] > 1:  # slice by slice: no slice leaks into the next
            np.testing.assert_allclose(made[:, 1].numpy(), resample_image(fine_cases[key][:, 1:2],
                                                                          coarse_data[:, 1:2].shape[1:])[:, 0],
                                       atol=1e-6)
        n += 1
    assert n == 5


def test_plans_before_0_8_keep_nnunets_resampling_and_one_input_serves_both_companions(planned_3d):
    """Without the key the predictor resamples as before (the configuration's nnU-Net function, on
    the CPU), and the coarse input is made once per case for the coarse and the centre-point model."""
    cascade = _predictor(planned_3d, "3d")
    cm = cascade.coarse.configuration_manager
    key, fine, _ = next(_cases(planned_3d.preprocessed_folder / planned_3d.plans["configurations"]["3d_fullres"]
                                ["data_identifier"]))
    data = torch.from_numpy(fine)
    first = cascade._coarse_input(data)
    assert cascade._coarse_input(data, cascade.coarse) is first  # the centre model's call finds it made
    cascade.__dict__.pop("_case_memo")
    del cm.configuration["sts"]["coarse_resampling"]
    old = cascade._coarse_input(data)
    cascade.__dict__.pop("_case_memo")
    fine_sp = np.array(cascade._fine_spacing3())
    coarse_sp = np.array(cascade._grid_spacing3_of(cascade.coarse))
    expected = cm.resampling_fn_data(fine, old.shape[1:], fine_sp, coarse_sp)
    np.testing.assert_array_equal(old.numpy(), expected)
    assert not np.allclose(old.numpy(), first.numpy(), atol=1e-3)  # the spline differs from the average


def test_the_coarse_trainer_refuses_data_made_by_another_resampling(planned_2d, tmp_path):
    """Data preprocessed by ``nnUNetv2_preprocess`` (nnU-Net's spline; no record in the case) under
    plans that say antialiased: one clear error before training, naming both ways out."""
    from nnunet_stseg.trainers.sts_trainers import nnUNetTrainer_StSCoarse

    config = coarse_config_name("2d", planned_2d.size)
    plans = {**copy.deepcopy(planned_2d.plans), "continue_training": False}  # as nnUNetv2_train hands it over
    trainer = nnUNetTrainer_StSCoarse(plans, config, 0, planned_2d.dataset_json, device=torch.device("cpu"))
    trainer._check_coarse_resampling()  # the folder nnunet-stseg plan made passes
    with open(next(trainer_cases(trainer)), "rb") as f:
        props = pickle.load(f)
    del props[COARSE_RESAMPLING_KEY]
    with open(tmp_path / "case_000.pkl", "wb") as f:
        pickle.dump(props, f)
    trainer.preprocessed_dataset_folder = str(tmp_path)
    with pytest.raises(RuntimeError, match=r"resampled to the coarse grid by nnU-Net .*nnUNetv2_preprocess.*"
                                           r"'antialiased'.*nnunet-stseg plan -d .* -s 32.*--coarse_resampling nnunet"):
        trainer._check_coarse_resampling()


def trainer_cases(trainer):
    from glob import glob
    from os.path import join

    return iter(sorted(glob(join(trainer.preprocessed_dataset_folder, "*.pkl"))))


# ----------------------------------------------------------------------------------------------
# geometry on the coarse grid
# ----------------------------------------------------------------------------------------------

def test_upsampling_slab_by_slab_equals_one_interpolation():
    """The canvas made slab by slab (any slab size, both branches) holds what one
    ``F.interpolate(align_corners=False)`` of the whole coarse output gives."""
    import torch.nn.functional as F

    from nnunet_stseg.core.geometry import upsample_probabilities

    coarse = torch.rand(3, 5, 6, 7)
    whole = F.interpolate(coarse[None], size=(23, 17, 30), mode="trilinear", align_corners=False)[0]
    for slab in (10 ** 9, 3 * 17 * 30, 7 * 3 * 17 * 30):
        np.testing.assert_allclose(upsample_probabilities(coarse, (23, 17, 30), slab_voxels=slab).numpy(),
                                   whole.numpy(), atol=1e-5)
    same_slices = F.interpolate(coarse[None], size=(5, 17, 30), mode="trilinear", align_corners=False)[0]
    half = upsample_probabilities(coarse, (5, 17, 30), torch.float16, slab_voxels=2 * 3 * 17 * 30)
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half.float().numpy(), same_slices.numpy(), atol=1e-3)
    # softmax probabilities: the background made from the other channels is the interpolated background
    softmax = torch.softmax(torch.randn(3, 5, 6, 7) * 3, 0)
    whole = F.interpolate(softmax[None], size=(23, 17, 30), mode="trilinear", align_corners=False)[0]
    for slab, dtype, atol in ((10 ** 9, torch.float32, 1e-5), (3 * 17 * 30, torch.float16, 1e-3)):
        rest = upsample_probabilities(softmax, (23, 17, 30), dtype, slab_voxels=slab, background_from_rest=True)
        np.testing.assert_allclose(rest.float().numpy(), whole.numpy(), atol=atol)
    two_class = torch.softmax(torch.randn(2, 1, 8, 8) * 3, 0)  # a 2D stage's (K, 1, Y, X)
    ours = upsample_probabilities(two_class, (1, 128, 128), torch.float16, background_from_rest=True)
    reference = upsample_probabilities(two_class, (1, 128, 128), torch.float16)
    assert (ours.argmax(0) != reference.argmax(0)).float().mean() < 1e-3  # only exact ties may differ


def test_objects_found_on_the_coarse_grid_get_the_full_grid_voxels_they_cover():
    """Components of a coarse mask give boxes on the full grid (rounded outward), judged by the
    size rule in full-grid millimetres, squared and fitted there."""
    from nnunet_stseg.core.geometry import CropParams, find_objects

    coarse = np.zeros((1, 16, 16), bool)
    coarse[0, 4:7, 2:8] = True      # 3 x 6 coarse cells = 12 x 24 full pixels
    coarse[0, 12, 12] = True        # one cell = 4 x 4 pixels: below the 5-pixel rule
    params = CropParams(patch_size=(1, 32, 32), margin_fraction=0.0, margin_min=0)
    found = find_objects(coarse, [1.0, 1.0, 1.0], params, image_shape=(1, 64, 64))
    assert found.tight_boxes.tolist() == [[[0, 1], [16, 28], [8, 32]]] and found.n_dropped == 1
    assert found.crop_boxes.tolist() == [[[0, 1], [10, 34], [8, 32]]]  # squared to 24 x 24
    assert found.labels.shape == coarse.shape


def test_the_cascade_on_the_coarse_grid_predicts_the_same_label_map(planned_3d):
    """The same coarse output (one-hot labels averaged on a 2 x 2 coarser grid) gives the same label
    map with the identity fine model whether the objects are found on the coarse grid (since 0.8) or
    on the probabilities brought to the full grid first (before): the same objects kept by the size
    rule, crops that still hold every voxel the upsampled foreground reaches, background elsewhere."""
    import torch.nn.functional as F
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_stseg.adapters.predictor import StSPredictor

    from stand_ins import IdentityNet

    pm = PlansManager(copy.deepcopy(planned_3d.plans))
    lm = pm.get_label_manager(planned_3d.dataset_json)
    folder = str(planned_3d.preprocessed_folder / planned_3d.plans["configurations"]["3d_fullres"]["data_identifier"])
    dataset = infer_dataset_class(folder)(folder)
    segs = (np.asarray(dataset.load_case(k)[1])[0] for k in dataset.identifiers)
    labels = np.clip(next(seg for seg in segs if (seg > 0).sum() > 500), 0, 1).astype(np.int64)
    one_hot = torch.from_numpy(np.stack([labels == 0, labels == 1]).astype(np.float32))
    grid = [labels.shape[0]] + [s // 2 for s in labels.shape[1:]]
    coarse_output = F.interpolate(one_hot[None], size=grid, mode="area")[0]

    class Oracle(StSPredictor):
        def coarse_output(self, data):
            return coarse_output.clone()

    p = Oracle(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.manual_initialization(IdentityNet(False), pm, pm.get_configuration(fine_config_name("2d", planned_3d.size)),
                            None, planned_3d.dataset_json, "nnUNetTrainer_StSFine", None)
    p.coarse = object()
    p._log = lambda msg: None
    outputs = {}
    for grid_of_objects in ("full", "coarse"):  # before 0.8: the coarse output upsampled first, objects found there
        p.objects_grid = grid_of_objects
        logits = p.predict_logits_from_preprocessed_data(one_hot)
        assert logits.dtype == torch.float16  # the canvas: half precision, as nnU-Net's own logits
        outputs[grid_of_objects] = lm.convert_logits_to_segmentation(logits).numpy()
        assert p.last_timings["n_boxes"] >= 5 and p.last_timings["n_dropped"] >= 1
    np.testing.assert_array_equal(outputs["coarse"], outputs["full"])
    agree = np.logical_and(outputs["full"] > 0, labels > 0).sum() * 2 / ((outputs["full"] > 0).sum()
                                                                         + (labels > 0).sum())
    assert agree > 0.97  # the identity model through S = 32 crops: objects larger than S lose some detail


def test_each_case_logs_its_stage_seconds_at_debug_level(planned_2d, capsys, monkeypatch):
    """``STSEG_LOG_LEVEL=debug``: one line per case with every stage's seconds, the networks' total
    and the rest; nothing at the default level."""
    import re

    cascade = _predictor(planned_2d, "2d")
    _, data, _ = next(_cases(planned_2d.preprocessed_folder / planned_2d.plans["configurations"]["2d"]
                             ["data_identifier"]))
    monkeypatch.delenv("STSEG_LOG_LEVEL", raising=False)
    cascade.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    assert "stage seconds" not in capsys.readouterr().out
    monkeypatch.setenv("STSEG_LOG_LEVEL", "debug")
    cascade.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    lines = [x for x in capsys.readouterr().out.splitlines() if "stage seconds" in x]
    assert len(lines) == 1
    assert re.search(r"DEBUG stage seconds: coarse input [\d.]+, coarse network [\d.]+, .*coarse to full grid "
                     r"[\d.]+.*; total [\d.]+ \(networks [\d.]+, other [\d.]+\)", lines[0]), lines[0]
    assert set(cascade.stage_seconds) >= {"coarse_input", "coarse_network", "coarse_to_full_grid", "geometry"}


def test_support_labels_never_mix_slices_of_a_2d_stage_and_follow_the_interpolation():
    """A 2D stage on a volume keeps its slices (factor 1 along z): every voxel's support lies in its
    own slice. In-plane, a voxel takes the component of the cells its interpolated value is made of,
    and a component's foreground after upsampling is found inside its own support only."""
    from nnunet_stseg.core.geometry import component_voxels, support_labels, upsample_probabilities

    labels = np.zeros((2, 2, 2), np.int32)
    labels[0, 0, 0], labels[1, 1, 1] = 1, 2
    up = support_labels(labels, np.array([[0, 2], [0, 4], [0, 4]]), (2, 4, 4))
    assert set(np.unique(up[0])) == {0, 1} and set(np.unique(up[1])) == {0, 2}
    fg = torch.zeros(2, 2, 2, 2)  # (K, Z, Y, X): slice 0 cell (0, 0) and slice 1 cell (1, 1) foreground
    fg[1, 0, 0, 0] = fg[1, 1, 1, 1] = 1.0
    fg[0] = 1 - fg[1]
    canvas = upsample_probabilities(fg, (2, 4, 4))
    first = component_voxels(canvas, labels, 1, np.array([[0, 2], [0, 4], [0, 4]]), False)
    assert first[0].any() and not first[1].any()
    np.testing.assert_array_equal(first[0], (canvas[1, 0] > canvas[0, 0]).numpy())


@pytest.mark.parametrize("grid,shape", [((1, 7, 9), (1, 50, 61)), ((4, 6, 5), (9, 30, 17)), ((3, 8), (3, 40))])
def test_support_labels_and_extents_match_every_corner_and_every_voxel(grid, shape):
    """The separable support (the largest label over each axis in turn) equals the largest label
    over all 2^ndim interpolation corners; the extents from the mask's projections equal the
    extents of its voxels (np.argwhere), an empty component gets start = stop."""
    from nnunet_stseg.core.geometry import component_voxels, foreground_extents, support_labels

    rng = np.random.default_rng(len(shape) + grid[0])
    labels = rng.integers(0, 4, size=grid).astype(np.int32)
    box = np.array([[a, b] for a, b in (sorted(rng.choice(s + 1, 2, replace=False)) for s in shape)])
    corners = []
    for d, (n, g) in enumerate(zip(shape, grid)):
        src = np.maximum((np.arange(box[d, 0], box[d, 1]) + 0.5) * g / n - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), g - 1)
        corners.append((lo, np.where(src - np.floor(src) > 1e-9, np.minimum(lo + 1, g - 1), lo)))
    expected = np.max([labels[np.ix_(*[corners[d][c] for d, c in enumerate(corner)])]
                       for corner in np.ndindex(*(2,) * len(grid))], axis=0)
    np.testing.assert_array_equal(support_labels(labels, box, shape), expected)

    probs = torch.from_numpy(rng.random((2, *shape)).astype(np.float32))
    probs[:, ..., :2] = torch.tensor([1.0, 0.0]).view(2, *(1,) * len(shape))  # some background for sure
    boxes = np.array([[[0, s] for s in shape]] * 4)
    extents = foreground_extents(probs, labels, boxes, False)
    for component in range(1, 5):
        voxels = np.argwhere(component_voxels(probs, labels, component, boxes[0], False))
        want = (np.stack([voxels.min(0), voxels.max(0) + 1], axis=1) if len(voxels)
                else np.zeros((len(shape), 2), np.int64))
        np.testing.assert_array_equal(extents[component - 1], want)


def test_a_proposal_below_the_decision_gets_the_box_of_its_threshold_on_the_full_grid():
    """Recall-first proposals found on the coarse grid: a faint component (0.35) has no voxel at the
    argmax decision on the full grid, so it is read at the proposal threshold there (its cells, the
    half-pixel interpolation edge above 0.3), while the decided component keeps its box."""
    from nnunet_stseg.core.geometry import CropParams, find_objects, recall_proposals, upsample_probabilities

    coarse = torch.zeros(2, 1, 16, 16)
    coarse[1, 0, 3:6, 3:6] = 0.9
    coarse[1, 0, 10:13, 10:13] = 0.35
    coarse[0] = 1 - coarse[1]
    decided = (coarse[1] > coarse[0]).numpy()
    proposals, n_extra = recall_proposals(decided, (1 - coarse[0]).numpy(), 0.3, [False, True, True])
    assert n_extra == 1
    canvas = upsample_probabilities(coarse, (1, 64, 64), torch.float16, background_from_rest=True)
    params = CropParams(patch_size=(1, 32, 32))
    at_decision = find_objects(proposals, [1, 1, 1], params, image_shape=(1, 64, 64), probabilities=canvas)
    found = find_objects(proposals, [1, 1, 1], params, image_shape=(1, 64, 64), probabilities=canvas,
                         decided=decided, proposal_threshold=0.3)
    assert at_decision.ids.tolist() == [1], "at the decision the faint component has no full-grid voxel"
    assert found.ids.tolist() == [1, 2] and found.below.tolist() == [False, True] and at_decision.below is None
    np.testing.assert_array_equal(found.tight_boxes[0], at_decision.tight_boxes[0])
    assert found.tight_boxes[0].tolist() == [[0, 1], [12, 24], [12, 24]]
    # cells 10..12 cover pixels 40..51; 0.35 fades to 0 over the outer half pixel-cells: >= 0.3 from 41 to 50
    assert found.tight_boxes[1].tolist() == [[0, 1], [41, 51], [41, 51]]
