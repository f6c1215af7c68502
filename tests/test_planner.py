"""The segment-then-segment planner: coarse/fine configurations next to nnU-Net's own.

Pure math of the coarse grid first, then the plans of two small planned datasets (2D: 981, 3D
anisotropic: 982, see conftest) and the errors a user can run into.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from nnunet_stseg.adapters.config import PlanOptions, StSConfig, coarse_config_name, fine_config_name
from nnunet_stseg.planners.plan_and_preprocess import plan_and_preprocess
from nnunet_stseg.planners.sts_planner import add_sts_configurations, coarse_spacing_and_shape, nnUNetPlannerStS

from stand_ins import fork_instead_of_spawn

S = 32


def _identifiers(folder) -> list[str]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return sorted(infer_dataset_class(str(folder)).get_identifiers(str(folder)))


def _dataset(folder):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return infer_dataset_class(str(folder))(str(folder))


# ----------------------------------------------------------------------------------------------
# coarse grid (pure math)
# ----------------------------------------------------------------------------------------------

def test_coarse_spacing_and_shape_downsamples_each_axis_by_its_own_factor():
    spacing, shape = coarse_spacing_and_shape([0.7, 0.8], [96, 128], 32)
    assert shape == [32, 32]
    np.testing.assert_allclose(spacing, [0.7 * 3, 0.8 * 4])


def test_coarse_spacing_and_shape_never_upsamples():
    spacing, shape = coarse_spacing_and_shape([1.0, 1.5], [20, 64], 32)
    assert shape == [20, 32]
    np.testing.assert_allclose(spacing, [1.0, 3.0])
    # every axis already small enough: nothing changes
    spacing, shape = coarse_spacing_and_shape([2.0, 0.5], [16, 32], 32)
    assert shape == [16, 32]
    np.testing.assert_allclose(spacing, [2.0, 0.5])


def test_coarse_spacing_and_shape_anisotropic_3d_keeps_thin_axis():
    spacing, shape = coarse_spacing_and_shape([3.0, 0.8, 0.8], [40, 512, 512], 64)
    assert shape == [40, 64, 64]
    np.testing.assert_allclose(spacing, [3.0, 6.4, 6.4])


def test_coarse_spacing_and_shape_non_integer_factor():
    spacing, shape = coarse_spacing_and_shape([1.0, 1.0], [100, 50], 32)
    assert shape == [32, 32]
    np.testing.assert_allclose(spacing, [100 / 32, 50 / 32])
    # physical extent is preserved
    np.testing.assert_allclose(np.array(spacing) * shape, [100, 50])


# ----------------------------------------------------------------------------------------------
# 2D dataset
# ----------------------------------------------------------------------------------------------

def test_2d_plans_contain_standard_and_sts_configurations(planned_2d):
    configs = planned_2d.plans["configurations"]
    coarse, fine = coarse_config_name("2d", S), fine_config_name("2d", S)
    assert coarse == "2d_sts_coarse_32" and fine == "2d_sts_fine_32"
    for name in ("2d", coarse, fine):
        assert name in configs, f"{name} missing from {sorted(configs)}"
    assert planned_2d.added == [coarse, fine]
    # a 2D dataset gets no 3D configurations
    assert not any(name.startswith("3d") for name in configs)


def test_2d_fine_shares_full_resolution_data(planned_2d):
    configs = planned_2d.plans["configurations"]
    fine = configs["2d_sts_fine_32"]
    base = configs["2d"]
    assert fine["data_identifier"] == base["data_identifier"]
    np.testing.assert_allclose(fine["spacing"], base["spacing"])
    assert list(fine["patch_size"]) == [S, S]
    feats = fine["architecture"]["arch_kwargs"]["features_per_stage"]
    assert feats[0] == planned_2d.features
    assert all(b == 2 * a for a, b in zip(feats, feats[1:])), feats
    # the standard configuration is untouched (nnU-Net's default width)
    assert base["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32
    assert list(base["patch_size"]) != [S, S]
    # the fine data folder exists and holds every training case
    folder = planned_2d.preprocessed_folder / fine["data_identifier"]
    assert _identifiers(folder) == planned_2d.case_ids


def test_2d_coarse_has_own_preprocessed_data(planned_2d):
    configs = planned_2d.plans["configurations"]
    coarse = configs["2d_sts_coarse_32"]
    base = configs["2d"]
    assert coarse["data_identifier"] != base["data_identifier"]
    folder = planned_2d.preprocessed_folder / coarse["data_identifier"]
    assert folder.is_dir()
    assert _identifiers(folder) == planned_2d.case_ids
    assert len(planned_2d.case_ids) == 5
    # median (96, 128) at spacing (0.7, 0.8) -> factors (3, 4)
    np.testing.assert_allclose(base["median_image_size_in_voxels"], [96, 128])
    assert all(m <= S for m in coarse["median_image_size_in_voxels"])
    np.testing.assert_allclose(coarse["spacing"], np.array(base["spacing"]) * [3, 4], rtol=1e-6)
    assert coarse["architecture"]["arch_kwargs"]["features_per_stage"][0] == planned_2d.features
    # the preprocessed cases really are on the coarse grid
    ds = _dataset(folder)
    for key in ds.identifiers:
        data, seg, _, props = ds.load_case(key)
        assert data.shape[0] == 1 and data.shape[1] == 1
        assert all(s <= S for s in data.shape[2:]), (key, data.shape)
        assert tuple(seg.shape[1:]) == tuple(data.shape[1:])


def test_2d_sts_blocks_parse(planned_2d):
    configs = planned_2d.plans["configurations"]
    fine = StSConfig.from_configuration(configs["2d_sts_fine_32"])
    coarse = StSConfig.from_configuration(configs["2d_sts_coarse_32"])
    assert fine.role == "fine" and coarse.role == "coarse"
    assert fine.input_size == S and coarse.input_size == S
    assert fine.crop is not None and fine.crop.patch_size == (1, S, S)
    assert list(fine.crop.active) == [False, True, True]
    assert fine.coarse_configuration == "2d_sts_coarse_32"
    assert coarse.coarse_configuration == "2d_sts_coarse_32"
    assert fine.coarse_trainer == coarse.coarse_trainer == "nnUNetTrainer_StSCoarse"
    assert fine.fallback == "coarse"
    assert coarse.crop is None
    # the block survives a JSON round trip unchanged
    assert json.loads(json.dumps(fine.to_dict())) == configs["2d_sts_fine_32"]["sts"]


# ----------------------------------------------------------------------------------------------
# 3D dataset (anisotropic: 24 slices of 2.5 mm, 64 x 64 of 0.9 mm)
# ----------------------------------------------------------------------------------------------

def test_3d_plans_contain_both_pipelines(planned_3d):
    configs = planned_3d.plans["configurations"]
    for name in ("2d", "3d_fullres", "2d_sts_coarse_32", "2d_sts_fine_32", "3d_sts_coarse_32", "3d_sts_fine_32"):
        assert name in configs, f"{name} missing from {sorted(configs)}"
    assert planned_3d.added == ["2d_sts_coarse_32", "2d_sts_fine_32", "3d_sts_coarse_32", "3d_sts_fine_32"]
    for name in ("2d_sts_coarse_32", "3d_sts_coarse_32"):
        folder = planned_3d.preprocessed_folder / configs[name]["data_identifier"]
        assert _identifiers(folder) == planned_3d.case_ids


def test_3d_fine_configuration(planned_3d):
    configs = planned_3d.plans["configurations"]
    fine = configs["3d_sts_fine_32"]
    full = configs["3d_fullres"]
    sts = StSConfig.from_configuration(fine)
    assert sts.role == "fine"
    assert sts.crop.patch_size == (S, S, S)
    assert sts.coarse_configuration == "3d_sts_coarse_32"
    assert list(fine["patch_size"]) == [S, S, S]
    np.testing.assert_allclose(fine["spacing"], full["spacing"])
    assert fine["data_identifier"] == full["data_identifier"]
    assert fine["architecture"]["arch_kwargs"]["features_per_stage"][0] == planned_3d.features
    # the 2D pipeline of a 3D dataset: slice-wise crops
    sts2 = StSConfig.from_configuration(configs["2d_sts_fine_32"])
    assert sts2.crop.patch_size == (1, S, S)
    assert configs["2d_sts_fine_32"]["data_identifier"] == configs["2d"]["data_identifier"]


def test_3d_coarse_keeps_thin_axis(planned_3d):
    configs = planned_3d.plans["configurations"]
    coarse = configs["3d_sts_coarse_32"]
    full = configs["3d_fullres"]
    c_sp, f_sp = np.array(coarse["spacing"]), np.array(full["spacing"])
    assert np.all(c_sp >= f_sp - 1e-9), (c_sp, f_sp)
    # z: 24 slices <= 32, never downsampled
    assert full["median_image_size_in_voxels"][0] == 24
    assert c_sp[0] == pytest.approx(f_sp[0])
    assert coarse["median_image_size_in_voxels"][0] == 24
    # in-plane: 64 -> 32
    np.testing.assert_allclose(c_sp[1:], f_sp[1:] * 2, rtol=1e-6)
    assert all(m <= S for m in coarse["median_image_size_in_voxels"])
    ds = _dataset(planned_3d.preprocessed_folder / coarse["data_identifier"])
    for key in ds.identifiers:
        data, _, _, _ = ds.load_case(key)
        assert data.shape[1] == 24 and all(s <= S for s in data.shape[1:]), (key, data.shape)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def planner_2d(planned_2d, monkeypatch):
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    return nnUNetPlannerStS(planned_2d.dataset_id, options=PlanOptions(input_size=S))


def _base_plans(planned) -> dict:
    plans = copy.deepcopy(planned.plans)
    for name in list(plans["configurations"]):
        if "_sts_" in name:
            del plans["configurations"][name]
    return plans


def test_add_sts_configurations_reproduces_saved_plans(planned_2d, planner_2d):
    plans = _base_plans(planned_2d)
    added = add_sts_configurations(planner_2d, plans, PlanOptions(input_size=S, base_features=planned_2d.features))
    assert added == ["2d_sts_coarse_32", "2d_sts_fine_32"]
    saved = planned_2d.plans["configurations"]
    for name in added:
        assert json.loads(json.dumps(plans["configurations"][name], default=lambda o: o.tolist())) == saved[name]


def test_3d_pipeline_on_2d_dataset_raises(planned_2d, planner_2d):
    plans = _base_plans(planned_2d)
    with pytest.raises(ValueError, match="3d"):
        add_sts_configurations(planner_2d, plans, PlanOptions(input_size=S, dims=["3d"]))
    assert not any("_sts_" in c for c in plans["configurations"])


def test_unknown_dimensionality_raises(planned_2d, planner_2d):
    with pytest.raises(ValueError, match="dimensionality"):
        PlanOptions(input_size=S, dims=["4d"])


def test_size_not_plannable_as_exact_patch_raises(planned_2d, planner_2d):
    # nnU-Net rounds a 36 patch up to 40 (a multiple of 2**num_pool); 40 itself is fine
    plans = _base_plans(planned_2d)
    with pytest.raises(ValueError, match="divisible"):
        add_sts_configurations(planner_2d, plans, PlanOptions(input_size=36))
    assert not any("_sts_" in c for c in plans["configurations"])
    added = add_sts_configurations(planner_2d, _base_plans(planned_2d), PlanOptions(input_size=40))
    assert added == ["2d_sts_coarse_40", "2d_sts_fine_40"]


@pytest.mark.parametrize("size", [0, 4, 7])
def test_size_below_8_raises(planned_2d, planner_2d, size):
    with pytest.raises(ValueError, match=">= 8"):
        PlanOptions(input_size=size)


def test_rerun_keeps_standard_configurations_and_reuses_fine_data(planned_2d, capsys):
    fine_folder = planned_2d.preprocessed_folder / planned_2d.plans["configurations"]["2d"]["data_identifier"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in fine_folder.iterdir()}
    capsys.readouterr()
    with fork_instead_of_spawn():
        added = plan_and_preprocess(planned_2d.dataset_id, PlanOptions(input_size=S, base_features=planned_2d.features),
                                    num_processes=1)
    out = capsys.readouterr().out
    assert added == planned_2d.added
    assert "reused" in out
    assert "2d_sts_fine_32" in out.split("reused")[0].splitlines()[-1]
    with open(planned_2d.plans_file) as f:
        plans = json.load(f)
    assert set(plans["configurations"]) == set(planned_2d.plans["configurations"])
    assert plans["configurations"]["2d"] == planned_2d.plans["configurations"]["2d"]
    for name in planned_2d.added:
        assert plans["configurations"][name] == planned_2d.plans["configurations"][name]
    # the shared full-resolution data was not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in fine_folder.iterdir()} == mtimes


# ----------------------------------------------------------------------------------------------
# the sts block
# ----------------------------------------------------------------------------------------------

def test_from_configuration_without_block_tells_user_to_plan(planned_2d):
    with pytest.raises(ValueError, match="nnunet-stseg plan"):
        StSConfig.from_configuration(planned_2d.plans["configurations"]["2d"], "configuration '2d'")
    with pytest.raises(ValueError, match="configuration '2d'"):
        StSConfig.from_configuration({}, "configuration '2d'")


def test_from_configuration_rejects_broken_blocks(planned_2d):
    good = planned_2d.plans["configurations"]["2d_sts_fine_32"]
    bad = copy.deepcopy(good)
    bad["sts"]["fallback"] = "nothing"
    with pytest.raises(ValueError, match="fallback"):
        StSConfig.from_configuration(bad)
    no_crop = copy.deepcopy(good)
    del no_crop["sts"]["crop"]
    with pytest.raises(ValueError, match="crop"):
        StSConfig.from_configuration(no_crop)
    unknown = copy.deepcopy(good)
    unknown["sts"]["crop"]["wobble"] = 1
    with pytest.raises(ValueError, match="wobble"):
        StSConfig.from_configuration(unknown)
    # a typo in the top level of the block is an error naming the key and where it is
    typo = copy.deepcopy(good)
    typo["sts"]["max_crop"] = 3
    with pytest.raises(ValueError, match=r"configuration '2d_sts_fine_32': unknown key\(s\) \['max_crop'\]"):
        StSConfig.from_configuration(typo, "configuration '2d_sts_fine_32'")
    bad_role = copy.deepcopy(good)
    bad_role["sts"]["role"] = "finer"
    with pytest.raises(ValueError, match="sts.role must be one of"):
        StSConfig.from_configuration(bad_role)
    # the original plans were not modified by parsing, and still parse
    assert "max_crop" not in good["sts"]
    assert StSConfig.from_configuration(good).to_dict() == good["sts"]
    assert os.path.isfile(planned_2d.plans_file)


def test_planner_works_with_in_process_augmentation_setting(planned_2d, monkeypatch):
    """nnUNet_n_proc_DA=0 crashes nnU-Net 2.8's own planner; ours plans and restores the value."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    planner = nnUNetPlannerStS(planned_2d.dataset_id,
                               options=PlanOptions(input_size=S, base_features=planned_2d.features))
    plans = planner.plan_experiment()
    assert os.environ["nnUNet_n_proc_DA"] == "0"
    assert {"2d_sts_coarse_32", "2d_sts_fine_32"} <= set(plans["configurations"])


def test_plans_of_every_format_still_load():
    """Plans written by every version that changed the format of the blocks load to the values they
    meant: before 0.7 a centre block without ``loss`` (an ``mse`` model), before 0.8 a coarse block
    without ``coarse_resampling`` (nnU-Net's resampling), before 0.9 the end-to-end, L-SNet and size
    blocks beside ``sts`` (``sts_e2e``, ``sts_lsnet``, ``sts_sizes``) instead of inside it."""
    from nnunet_stseg.adapters.config import CentreParams, E2EParams, LSNetParams, SizeParams
    from nnunet_stseg.core.geometry import CropParams
    from nnunet_stseg.planners.sts_planner import e2e_configuration, lsnet_configuration

    fine = {"sts": StSConfig("fine", 32, "2d_sts_coarse_32", crop=CropParams((1, 32, 32))).to_dict()}
    e2e = e2e_configuration(fine, {"box_rule": "objects", "canvas": [64, 64]})
    lsnet = lsnet_configuration(fine, {"gamma": 0.0, "fallback": "best"})
    sizes = {"sts": {"sizes": {"size_weight": 0.5, "pretrain_epochs": 3}}}
    assert "sts_e2e" not in e2e and e2e["sts"]["e2e"]["box_rule"] == "objects"  # 0.9 writes them inside

    def before_0_9(cfg: dict) -> dict:
        old = copy.deepcopy(cfg)
        for key in ("e2e", "lsnet", "sizes"):
            if key in old["sts"]:
                old[f"sts_{key}"] = old["sts"].pop(key)
        return old

    for new in (e2e, lsnet):
        old = before_0_9(new)
        assert set(old["sts"]) == set(fine["sts"])
        assert StSConfig.from_configuration(old) == StSConfig.from_configuration(new)
    assert StSConfig.from_configuration(before_0_9(e2e)).e2e == E2EParams(box_rule="objects", canvas=[64, 64])
    assert LSNetParams.from_configuration(before_0_9(lsnet)) == LSNetParams(gamma=0.0, fallback="best")
    assert SizeParams.from_configuration(before_0_9(sizes)) == SizeParams(size_weight=0.5, pretrain_epochs=3)
    # before 0.8 and before 0.7: the coarse block without coarse_resampling, its centre without loss
    coarse = StSConfig("coarse", 32, "2d_sts_coarse_32", centre=CentreParams(sigma=2.0)).to_dict()
    del coarse["coarse_resampling"], coarse["centre"]["loss"]
    old_coarse = StSConfig.from_configuration({"sts": coarse})
    assert (old_coarse.coarse_resampling, old_coarse.centre.loss) == ("nnunet", "mse")
    # a block in both places is not ambiguous: the one inside sts is the plan's
    both = {**e2e, "sts_e2e": {"box_rule": "all"}}
    assert E2EParams.from_configuration(both).box_rule == "objects"


@pytest.mark.parametrize("planner_name,arch", [
    ("ExperimentPlanner", "dynamic_network_architectures.architectures.unet.PlainConvUNet"),
    ("nnUNetPlannerResEncM", "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet")])
def test_the_vram_estimate_builds_its_network_on_the_meta_device_and_gives_nnunets_number(monkeypatch, planner_name,
                                                                                            arch):
    """Our planners' VRAM estimate is nnU-Net's own, with the network built on torch's meta device
    (no weights allocated or initialised): the same number for a 3D residual and plain U-Net."""
    import nnunetv2.experiment_planning.experiment_planners.default_experiment_planner as default_planner

    from nnunet_stseg.planners.sts_planner import sts_planner_class

    kwargs = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
              "kernel_sizes": [[3, 3, 3]] * 5, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
              "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
              "nonlin_kwargs": {"inplace": True}, "n_conv_per_stage_decoder": [1] * 4}
    kwargs.update({"n_blocks_per_stage": [1, 3, 4, 6, 6]} if "Residual" in arch else {"n_conv_per_stage": [2] * 5})
    args = ((64, 96, 96), 1, 3, arch, kwargs, ("conv_op", "norm_op", "dropout_op", "nonlin"))
    cls = sts_planner_class(planner_name)
    devices = []
    build = default_planner.get_network_from_plans

    def recorded(*a, **k):
        net = build(*a, **k)
        devices.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(default_planner, "get_network_from_plans", recorded)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's estimate sets torch's threads to it
    ours = cls.static_estimate_VRAM_usage(object.__new__(cls), *args)
    theirs = cls.__mro__[2].static_estimate_VRAM_usage(*args)  # the nnU-Net planner under the mixin
    assert ours == theirs > 0 and devices == ["meta", "cpu"]
