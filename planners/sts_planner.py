"""Planner that adds segment-then-segment configurations to a dataset's nnU-Net plans.

For each dimensionality (``2d``; ``3d`` when the dataset is 3D) it adds, next to nnU-Net's
standard configurations:

- ``<dim>_sts_coarse_<S>``: the whole image at reduced resolution. Every axis is downsampled by
  its own factor ``max(1, median_extent / S)``, so the median case is at most S voxels per axis
  and no axis is ever upsampled. Per-axis factors keep thin axes (e.g. 40 slices of 3 mm) at
  full resolution instead of squashing them further; the spacing written into the plans keeps
  the geometry physically correct.
- ``<dim>_sts_fine_<S>``: crops resampled to S per active axis. It shares the preprocessed data
  of ``3d_fullres`` / ``2d`` (same ``data_identifier``: crops are cut from the full-resolution
  grid at training time) and gets a network planned for an isotropic S patch, because crops are
  squared in millimetres and therefore isotropic once resampled.
- ``2d_sts_polar_<S>`` (with ``polar=True``, 2d only): the polar stage. Like the 2d fine
  configuration it shares the full-resolution ``2d`` data and has a network planned for an S x S
  patch; its input is the S x S polar image (angles x radii) around one object. The 2d coarse
  configuration then also gets ``sts.centre``: the centre-point heatmap's sigma, chosen from the
  median size of the training labels' objects (read once at planning).
"""
from __future__ import annotations

import os
from copy import deepcopy
from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_stseg.adapters.config import (E2E_KEY, LSNET_KEY, CentreParams, E2EParams, LSNetParams, PlanOptions,
                                          PolarParams, StSConfig, coarse_config_name, e2e_config_name, fine_config_name,
                                          lsnet_config_name, polar_config_name, with_block)
from nnunet_stseg.core.centres import default_sigma, equivalent_radii
from nnunet_stseg.core.depth import DEPTH_KEY, check_depth_applicable
from nnunet_stseg.core.geometry import CropParams


def coarse_spacing_and_shape(spacing: Sequence[float], median_shape: Sequence[float], size: int
                             ) -> tuple[list[float], list[int]]:
    """Per-axis downsampling so the median case is <= ``size`` voxels on every axis."""
    spacing = np.asarray(spacing, dtype=float)
    median_shape = np.asarray(median_shape, dtype=float)
    factor = np.maximum(1.0, median_shape / size)
    return [float(s) for s in spacing * factor], [int(min(size, round(m))) for m in median_shape / factor]


def median_object_radius_2d(planner: ExperimentPlanner, transpose_forward: Sequence[int]) -> tuple[float, int]:
    """Median equivalent radius (pixels of the full-resolution grid) of the 2D objects of the
    training labels (8-connected components of each slice's foreground, in nnU-Net's transposed
    axis order, so slices are what the 2d configurations see), and how many objects there were."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from tqdm import tqdm

    cases = get_filenames_of_train_images_and_targets(planner.raw_dataset_folder, planner.dataset_json)
    first = next(iter(cases.values()))
    reader = determine_reader_writer_from_dataset_json(planner.dataset_json, first["images"][0])()
    radii = []
    for case in tqdm(cases.values(), desc="object sizes for the centre heatmap", unit="case"):
        seg, _ = reader.read_seg(case["label"])
        seg = seg[0].transpose(tuple(int(a) for a in transpose_forward))
        radii.append(equivalent_radii(seg > 0))
    radii = np.concatenate(radii) if radii else np.zeros(0)
    if len(radii) == 0:
        return float("nan"), 0
    return float(np.median(radii)), int(len(radii))


def set_width(config: dict, base_features: int | None, max_features: int | None) -> None:
    kwargs = config["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    current = list(kwargs["features_per_stage"])
    base = base_features if base_features is not None else current[0]
    top = max_features if max_features is not None else max(current)
    kwargs["features_per_stage"] = [int(min(top, base * 2 ** i)) for i in range(n)]


def _check_dims(plans: dict, dims: Sequence[str], available: Sequence[str]) -> None:
    for d in dims:
        if d not in available:
            raise ValueError(f"dataset {plans['dataset_name']} has no {'3d_fullres' if d == '3d' else d} "
                             f"configuration, so it cannot get a {d} segment-then-segment pipeline "
                             f"(3d needs 3D images)")


def _cascade_pair(planner: ExperimentPlanner, base: dict, coarse_name: str, options: PlanOptions
                  ) -> tuple[dict, dict, list[float]]:
    """The coarse and fine configurations of one dimensionality (without their ``sts`` blocks) and
    the coarse grid's spacing. Raises when nnU-Net would not keep S as the fine patch."""
    s, nd = int(options.input_size), len(base["patch_size"])
    n_train = planner.dataset_json["numTraining"]
    spacing, median = base["spacing"], base["median_image_size_in_voxels"]
    c_spacing, c_median = coarse_spacing_and_shape(spacing, median, s)
    coarse = planner.get_plans_for_configuration(c_spacing, c_median, planner.generate_data_identifier(coarse_name),
                                                 float(np.prod(c_median, dtype=np.float64) * n_train), {})
    coarse["batch_dice"] = base.get("batch_dice", False)
    approx_voxels = float(np.prod(median, dtype=np.float64) * n_train)
    arch = planner.get_plans_for_configuration([1.0] * nd, [s] * nd, base["data_identifier"], approx_voxels, {})
    if list(arch["patch_size"]) != [s] * nd:
        raise ValueError(f"nnU-Net turns S={s} into a {list(arch['patch_size'])} patch (the patch must stay "
                         f"divisible at every pooling step), so crops could not be exactly S per axis; choose "
                         f"an S that nnU-Net keeps, e.g. {int(arch['patch_size'][-1])} or 32, 48, 64, 128")
    fine = deepcopy(base)
    fine["patch_size"] = [s] * nd
    fine["architecture"] = deepcopy(arch["architecture"])
    fine["batch_size"] = arch["batch_size"]
    for cfg in (coarse, fine):
        set_width(cfg, options.base_features, options.max_features)
        if options.batch_size is not None:
            cfg["batch_size"] = int(options.batch_size)
    return coarse, fine, c_spacing


def _polar_configuration(planner: ExperimentPlanner, plans: dict, coarse: dict, fine: dict, c_spacing: list[float],
                         options: PlanOptions) -> dict:
    """The 2d polar configuration (a copy of the 2d fine one with a ``polar`` block); also writes
    the centre-point model's ``sts.centre`` into ``coarse``, sigma from the training objects."""
    s = int(options.input_size)
    radius, n_objects = median_object_radius_2d(planner, plans["transpose_forward"])
    if n_objects == 0:
        raise ValueError(f"dataset {plans['dataset_name']} has no foreground objects in its training labels; "
                         f"the polar stage needs some")
    factor = float(np.mean(np.asarray(c_spacing[-2:]) / np.asarray(fine["spacing"][-2:])))
    coarse_radius = radius / factor
    coarse["sts"]["centre"] = CentreParams(**{"sigma": round(default_sigma(coarse_radius), 3),
                                              "median_object_radius": round(coarse_radius, 3),
                                              "objects_measured": n_objects, "loss": options.centre_loss,
                                              **options.centre_params}).to_dict()
    params = PolarParams(**{"polar_shape": (s, s), **options.polar_params})
    if tuple(params.polar_shape) != (s, s):
        raise ValueError(f"the polar network's patch is S x S = {s} x {s}; polar_shape "
                         f"{list(params.polar_shape)} would not match it")
    polar_cfg = deepcopy(fine)
    polar_cfg["sts"] = StSConfig("polar", s, coarse["sts"]["coarse_configuration"], options.coarse_trainer,
                                 fallback="coarse", polar=params, **options.sts_params).to_dict()
    return polar_cfg


def e2e_configuration(fine: dict, params: dict | None = None) -> dict:
    """The end-to-end configuration: a copy of the 2d fine one (same full-resolution data, crop
    parameters and coarse companion) with role ``e2e`` and an ``sts.e2e`` block
    (:class:`~nnunet_stseg.adapters.config.E2EParams`; both modules take the coarse configuration's
    architecture, read by the trainer from the plans)."""
    cfg = deepcopy(fine)
    cfg["sts"]["role"] = "e2e"
    return with_block(cfg, E2E_KEY, E2EParams(**(params or {})).to_dict())


def lsnet_configuration(fine: dict, params: dict | None = None) -> dict:
    """The L-SNet configuration: a copy of the 2d fine one (same full-resolution data, crop
    parameters, S-Net architecture and patch, coarse companion: L-Net's architecture and input
    size) with role ``lsnet`` and an ``sts.lsnet`` block (:class:`~nnunet_stseg.adapters.config.LSNetParams`)."""
    cfg = deepcopy(fine)
    cfg["sts"]["role"] = "lsnet"
    return with_block(cfg, LSNET_KEY, LSNetParams(**(params or {})).to_dict())


def add_sts_configurations(planner: ExperimentPlanner, plans: dict, options: PlanOptions) -> list[str]:
    """Add the configurations ``options`` asks for to ``plans`` (in place): coarse + fine for every
    dimensionality, the depth channel on the 2d ones, the 2d polar configuration. Returns the names
    added. Nothing is added when any of them cannot be planned."""
    s = int(options.input_size)
    configs = plans["configurations"]
    available = [d for d, base in (("2d", "2d"), ("3d", "3d_fullres")) if base in configs]
    dims = list(options.dims) if options.dims else available
    _check_dims(plans, dims, available)
    if options.polar and "2d" not in dims:
        raise ValueError("the polar stage is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.e2e and "2d" not in dims:
        raise ValueError("the end-to-end model is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.e2e and options.depth_channel:
        raise ValueError("the end-to-end model has no depth channel: plan --e2e and --depth into different plans")
    if options.lsnet and "2d" not in dims:
        raise ValueError("L-SNet is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.lsnet and options.depth_channel:
        raise ValueError("L-SNet has no depth channel: plan --lsnet and --depth into different plans")
    new: dict[str, dict] = {}
    for d in dims:
        base = configs["3d_fullres" if d == "3d" else "2d"]
        coarse_name, fine_name = coarse_config_name(d, s), fine_config_name(d, s)
        coarse, fine, c_spacing = _cascade_pair(planner, base, coarse_name, options)
        crop = CropParams(patch_size=(s,) * 3 if len(base["patch_size"]) == 3 else (1, s, s), **options.crop)
        coarse["sts"] = StSConfig("coarse", s, coarse_name, options.coarse_trainer,
                                  coarse_resampling=options.coarse_resampling).to_dict()
        fine["sts"] = StSConfig("fine", s, coarse_name, options.coarse_trainer, crop=crop,
                                fallback=options.fallback, **options.sts_params).to_dict()
        if options.depth_channel and d == "2d":
            check_depth_applicable(fine["patch_size"], plans.get("original_median_shape_after_transp", [1]),
                                   f"--depth for dataset {plans['dataset_name']}")
            coarse[DEPTH_KEY] = fine[DEPTH_KEY] = True
        new[coarse_name], new[fine_name] = coarse, fine
        if options.polar and d == "2d":
            new[polar_config_name(s)] = _polar_configuration(planner, plans, coarse, fine, c_spacing, options)
        if options.e2e and d == "2d":
            new[e2e_config_name(d, s)] = e2e_configuration(fine, options.e2e_params)
        if options.lsnet and d == "2d":
            new[lsnet_config_name(s)] = lsnet_configuration(fine, options.lsnet_params)
    configs.update(new)
    return list(new)


class nnUNetPlannerStS(ExperimentPlanner):
    """nnU-Net's default planner plus the segment-then-segment configurations.

    Runs the standard planning (so the usual ``2d``/``3d_fullres`` configurations exist and
    are untouched), then adds ours and saves the plans again. Existing custom configurations in
    the plans file are kept, as nnU-Net does."""

    def __init__(self, dataset_name_or_id, options: PlanOptions | None = None, **kwargs):
        super().__init__(dataset_name_or_id, **kwargs)
        self.sts_options = options if options is not None else PlanOptions()
        self.sts_configurations: list[str] = []

    def plan_experiment(self):
        # nnU-Net 2.8's VRAM estimate calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
        # (a common CPU setting meaning "augment in-process"): plan with 1, restore the user's value.
        saved = os.environ.get("nnUNet_n_proc_DA")
        if saved is not None and saved.strip() == "0":
            os.environ["nnUNet_n_proc_DA"] = "1"
        try:
            plans = super().plan_experiment()
            self.sts_configurations = add_sts_configurations(self, plans, self.sts_options)
        finally:
            if saved is not None:
                os.environ["nnUNet_n_proc_DA"] = saved
        self.plans = plans
        self.save_plans(plans)
        return plans
