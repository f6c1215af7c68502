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

Without S (``PlanOptions.input_size`` None, ``nnunet-stseg plan`` without ``-s``) the planner first
makes the object fingerprint of the training labels (:func:`object_fingerprint`, cached as
``object_fingerprint.json`` next to nnU-Net's ``dataset_fingerprint.json``) and chooses S, the coarse
grid (per-axis downsampling from the small objects' extents; the coarse network's patch planned
by nnU-Net for that grid, with its sliding window where the coarse image is larger), the size rule
and ``max_crops`` by the rules of :mod:`nnunet_stseg.core.autoplan`; explicit ``--set`` values win
over each choice. What was chosen, why, and what was given goes into the fine configuration's
``sts.planning`` and the log.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from copy import deepcopy
from typing import NamedTuple, Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_stseg.adapters.config import (E2E_KEY, LSNET_KEY, CentreParams, E2EParams, LSNetParams, PlanOptions,
                                          PolarParams, StSConfig, coarse_config_name, e2e_config_name, fine_config_name,
                                          grid_spacing3, lsnet_config_name, polar_config_name, with_block)
from nnunet_stseg.core import autoplan
from nnunet_stseg.core.centres import default_sigma, equivalent_radii
from nnunet_stseg.core.fingerprint import SPECK_FRACTION, object_records, objects_without_specks, summarise_objects
from nnunet_stseg.core.depth import DEPTH_KEY, check_depth_applicable
from nnunet_stseg.core.geometry import CropParams


class PlanningError(ValueError):
    """A dataset or an option the planner cannot plan for; ``nnunet-stseg plan`` prints the message
    as one error line (no traceback)."""


def coarse_spacing_and_shape(spacing: Sequence[float], median_shape: Sequence[float], size: int
                             ) -> tuple[list[float], list[int]]:
    """Per-axis downsampling so the median case is <= ``size`` voxels on every axis."""
    spacing = np.asarray(spacing, dtype=float)
    median_shape = np.asarray(median_shape, dtype=float)
    factor = np.maximum(1.0, median_shape / size)
    return [float(s) for s in spacing * factor], [int(min(size, round(m))) for m in median_shape / factor]


def _training_cases(planner: ExperimentPlanner) -> dict:
    """nnU-Net's ``{case: {"images": [...], "label": ...}}`` of the dataset's training cases."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    return get_filenames_of_train_images_and_targets(planner.raw_dataset_folder, planner.dataset_json)


def _training_labels(planner: ExperimentPlanner, cases: dict, transpose_forward: Sequence[int], desc: str):
    """Each training label as nnU-Net's reader returns it, in nnU-Net's transposed axis order:
    yields ``(case, seg (Z, Y, X), spacing per axis in mm)``, sorted by case, with a progress bar."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from tqdm import tqdm

    keys = sorted(cases)
    reader = determine_reader_writer_from_dataset_json(planner.dataset_json, cases[keys[0]]["images"][0])()
    axes = tuple(int(a) for a in transpose_forward)
    for key in tqdm(keys, desc=desc, unit="case", mininterval=5):
        seg, props = reader.read_seg(cases[key]["label"])
        yield key, seg[0].transpose(axes), [float(props["spacing"][a]) for a in axes]


def median_object_radius_2d(planner: ExperimentPlanner, transpose_forward: Sequence[int]) -> tuple[float, int]:
    """Median equivalent radius (pixels of the full-resolution grid) of the 2D objects of the
    training labels (8-connected components of each slice's foreground, in nnU-Net's transposed
    axis order, so slices are what the 2d configurations see), and how many objects there were."""
    radii = [equivalent_radii(seg > 0) for _, seg, _ in
             _training_labels(planner, _training_cases(planner), transpose_forward,
                              "object sizes for the centre heatmap")]
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
            raise PlanningError(f"dataset {plans['dataset_name']} has no {'3d_fullres' if d == '3d' else d} "
                             f"configuration, so it cannot get a {d} segment-then-segment pipeline "
                             f"(3d needs 3D images)")


def _fine_architecture(planner: ExperimentPlanner, base: dict, s: int) -> dict:
    """nnU-Net's plan for an isotropic S patch on the base configuration's data (the fine network)."""
    nd = len(base["patch_size"])
    approx_voxels = float(np.prod(base["median_image_size_in_voxels"], dtype=np.float64)
                          * planner.dataset_json["numTraining"])
    return planner.get_plans_for_configuration([1.0] * nd, [s] * nd, base["data_identifier"], approx_voxels, {})


def _cascade_pair(planner: ExperimentPlanner, base: dict, coarse_name: str, s: int, options: PlanOptions,
                  coarse_grid: tuple[list[float], list[float]] | None = None) -> tuple[dict, dict, list[float]]:
    """The coarse and fine configurations of one dimensionality (without their ``sts`` blocks) and
    the coarse grid's spacing: ``coarse_grid`` (spacing, median shape), else the median image at S
    voxels per axis. Raises when nnU-Net would not keep S as the fine patch."""
    nd = len(base["patch_size"])
    n_train = planner.dataset_json["numTraining"]
    spacing, median = base["spacing"], base["median_image_size_in_voxels"]
    c_spacing, c_median = coarse_grid if coarse_grid is not None else coarse_spacing_and_shape(spacing, median, s)
    coarse = planner.get_plans_for_configuration(c_spacing, c_median, planner.generate_data_identifier(coarse_name),
                                                 float(np.prod(c_median, dtype=np.float64) * n_train), {})
    coarse["batch_dice"] = base.get("batch_dice", False)
    arch = _fine_architecture(planner, base, s)
    if list(arch["patch_size"]) != [s] * nd:
        raise PlanningError(f"nnU-Net turns S={s} into a {list(arch['patch_size'])} patch (the patch must stay "
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
    s = int(fine["patch_size"][-1])
    radius, n_objects = median_object_radius_2d(planner, plans["transpose_forward"])
    if n_objects == 0:
        raise PlanningError(f"dataset {plans['dataset_name']} has no foreground objects in its training labels; "
                         f"the polar stage needs some")
    factor = float(np.mean(np.asarray(c_spacing[-2:]) / np.asarray(fine["spacing"][-2:])))
    coarse_radius = radius / factor
    coarse["sts"]["centre"] = CentreParams(**{"sigma": round(default_sigma(coarse_radius), 3),
                                              "median_object_radius": round(coarse_radius, 3),
                                              "objects_measured": n_objects, "loss": options.centre_loss,
                                              **options.centre_params}).to_dict()
    params = PolarParams(**{"polar_shape": (s, s), **options.polar_params})
    if tuple(params.polar_shape) != (s, s):
        raise PlanningError(f"the polar network's patch is S x S = {s} x {s}; polar_shape "
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


OBJECT_FINGERPRINT_FILE = "object_fingerprint.json"
FINGERPRINT_VERSION = 2


def _label_classes(dataset_json: dict) -> list[int]:
    """The integer label values of the dataset's classes (regions: their member labels)."""
    values = set()
    for name, value in dataset_json["labels"].items():
        if name in ("background", "ignore"):
            continue
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if int(v) > 0)
    return sorted(values)


def object_fingerprint(planner: ExperimentPlanner, transpose_forward: Sequence[int]) -> dict:
    """The object fingerprint of the training labels (:mod:`nnunet_stseg.core.fingerprint`): objects
    per class and over all classes, for a 2D stage (per slice, in nnU-Net's transposed axis order)
    and, on 3D data, a 3D stage; plus the median image extent in mm. Read from
    ``object_fingerprint.json`` in the preprocessed dataset folder when it was made for the same
    training cases, else made (one pass over the labels) and written there."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_stseg.atomic import write_json_atomic

    path = os.path.join(str(nnUNet_preprocessed), planner.dataset_name, OBJECT_FINGERPRINT_FILE)
    cases = _training_cases(planner)
    keys = sorted(cases)
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("version") == FINGERPRINT_VERSION and cached.get("cases") == keys:
            print(f"[nnunet-stseg] object fingerprint reused: {path}")
            return cached
    classes = _label_classes(planner.dataset_json)
    ignore = planner.dataset_json["labels"].get("ignore")
    per_stage: dict[str, list] = {"2d": [], "3d": []}
    image_mm = []
    for key, seg, spacing in _training_labels(planner, cases, transpose_forward, "object fingerprint"):
        if ignore is not None:
            seg = np.where(seg == int(ignore), 0, seg)
        image_mm.append(np.asarray(seg.shape, dtype=float) * spacing)
        per_stage["2d"] += object_records(seg, spacing, [False, True, True], classes, key)
        if seg.shape[0] > 1:
            per_stage["3d"] += object_records(seg, spacing, [True, True, True], classes, key)
    fingerprint = {"version": FINGERPRINT_VERSION, "cases": keys, "classes": classes,
                   "median_image_mm": [round(float(v), 4) for v in np.median(image_mm, axis=0)]}
    for stage, records in per_stage.items():
        objects, specks = objects_without_specks(records)
        fingerprint[stage] = summarise_objects(records + objects, keys) if records else None
        fingerprint[f"{stage}_specks"] = specks
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(fingerprint, path, indent=1)
    print(f"[nnunet-stseg] object fingerprint of {len(keys)} training cases written to {path}")
    return fingerprint


class AutoChoices(NamedTuple):
    """What :func:`choose_from_objects` decided for one dimensionality."""

    s: int
    coarse_grid: tuple[list[float], list[float]]
    crop: dict
    sts_params: dict
    planning: dict
    notes: list[str]


def _largest_kept_s(planner: ExperimentPlanner, base: dict, candidates: Sequence[int]) -> int | None:
    """The largest candidate S that nnU-Net keeps as the fine patch (its memory target and pooling)."""
    nd = len(base["patch_size"])
    for s in sorted(candidates, reverse=True):
        if list(_fine_architecture(planner, base, s)["patch_size"]) == [s] * nd:
            return s
    return None


def choose_from_objects(planner: ExperimentPlanner, base: dict, dim: str, fingerprint: dict, options: PlanOptions,
                        rules: autoplan.AutoPlanRules = autoplan.AutoPlanRules()) -> AutoChoices:
    """S, the coarse grid, the size rule and ``max_crops`` of one dimensionality from the object
    fingerprint (:mod:`nnunet_stseg.core.autoplan`); values in ``options`` (``--set``) are kept."""
    summary = fingerprint.get(dim) or fingerprint["2d"]
    if not summary or "objects" not in summary:
        raise PlanningError(f"dataset {planner.dataset_name} has no foreground objects in its training labels: nothing "
                         f"to choose S and the coarse grid from; give -s")
    active = [dim == "3d", True, True]
    spacing3 = grid_spacing3(base["spacing"])
    median = [float(v) for v in base["median_image_size_in_voxels"]]
    median3 = median if len(median) == 3 else [1.0] + median
    finest = min(sp for sp, a in zip(spacing3, active) if a)
    notes = []
    crop = CropParams(patch_size=(8,) * 3, **{k: v for k, v in options.crop.items() if k != "patch_size"})
    if "margin_fraction" in options.crop:  # the coarse voxel must stay within the crop's margin
        rules = dataclasses.replace(rules, coarse_voxels=autoplan.object_voxels(crop.margin_fraction))
    objects = summary["objects"]  # the union components the cascade crops, specks left out
    small = [e.get(rules.small_quantile, math.nan) for e in objects["extent_mm"]]
    c_spacing3, c_median3, factors = autoplan.coarse_grid(spacing3, median3, small, active, rules)
    if all(f == 1.0 for f, a in zip(factors.value, active) if a):
        notes.append(f"{dim}: the small objects ({rules.small_quantile} extent {', '.join(f'{v:g}' for v in small)} mm) "
                     f"are under {rules.coarse_voxels:g} voxels of the full-resolution grid wide: no coarse grid coarser "
                     f"than the full resolution keeps them; the coarse stage runs at full resolution")
    specks = fingerprint.get(f"{dim}_specks", 0)
    if specks:
        notes.append(f"{dim}: {specks} label component(s) under {100 * SPECK_FRACTION:g} % of the median object's volume "
                     f"left out as specks")
    for name, cls in summary.items():  # a class whose typical object no coarse grid keeps
        if name in ("all", "objects") or not cls["extent_mm"][1]:
            continue
        if min(cls["extent_mm"][a]["p50"] / spacing3[a] for a in range(3) if active[a]) < rules.coarse_voxels:
            notes.append(f"{dim}: class {name}: its median object is under {rules.coarse_voxels:g} voxels of the "
                         f"full-resolution grid on some axis: too small for any coarse grid coarser than the full "
                         f"resolution (the fine stage segments it inside the crops of larger objects only)")
    typical = [objects["extent_mm"][a][rules.typical_quantile] for a in range(3)]
    largest = _largest_kept_s(planner, base, rules.s_candidates)
    if largest is None:
        raise PlanningError(f"nnU-Net keeps none of S = {list(rules.s_candidates)} as the {dim} fine patch within its "
                            f"memory target (-gpu_memory_target): give -s, or a larger target")
    image_voxels = max(m * sp / finest for m, sp, a in zip(median3, spacing3, active) if a)
    s_choice = autoplan.input_size(typical, spacing3, active, crop.margin_fraction, crop.margin_min, largest, rules,
                                   image_voxels)
    # along the axes the size rule measures (those about as fine as the finest, core.geometry.size_thresholds)
    smallest_voxels = min(objects["extent_mm"][a]["p1"] / finest for a in range(3)
                          if active[a] and spacing3[a] <= finest * 1.01)
    rule_choice = autoplan.size_rule(smallest_voxels, rules)
    channels = len(planner.dataset_json["channel_names"]) + len(_label_classes(planner.dataset_json)) + 1
    crops_choice = autoplan.max_crops(objects["objects_per_case"]["max"], s_choice.value, sum(active),
                                      channels, rules)
    cannot = autoplan.cascade_cannot_help(typical, fingerprint["median_image_mm"], active, rules)
    if cannot:
        notes.append(f"{dim}: {cannot}")
    chosen = {"input_size": s_choice, "coarse_downsampling": factors, "min_object_size": rule_choice,
              "max_crops": crops_choice}
    given = {k: v for k, v in {**options.crop, **options.sts_params}.items() if k in ("min_object_size", "max_crops")}
    planning = {"chosen": {k: {"value": c.value, "why": c.why} for k, c in chosen.items() if k not in given},
                "given": given, "notes": notes, "rules": rules.to_dict(), "fingerprint": OBJECT_FINGERPRINT_FILE,
                "finest_spacing_mm": finest}
    c_grid = ([c_spacing3[a] for a in range(3 - len(median), 3)], [c_median3[a] for a in range(3 - len(median), 3)])
    return AutoChoices(int(s_choice.value), c_grid,
                       {} if "min_object_size" in given else {"min_object_size": rule_choice.value},
                       {} if "max_crops" in given else {"max_crops": crops_choice.value}, planning, notes)


def add_sts_configurations(planner: ExperimentPlanner, plans: dict, options: PlanOptions) -> list[str]:
    """Add the configurations ``options`` asks for to ``plans`` (in place): coarse + fine for every
    dimensionality, the depth channel on the 2d ones, the 2d polar configuration. Returns the names
    added. Nothing is added when any of them cannot be planned."""
    configs = plans["configurations"]
    available = [d for d, base in (("2d", "2d"), ("3d", "3d_fullres")) if base in configs]
    dims = list(options.dims) if options.dims else available
    _check_dims(plans, dims, available)
    if options.polar and "2d" not in dims:
        raise PlanningError("the polar stage is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.e2e and "2d" not in dims:
        raise PlanningError("the end-to-end model is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.e2e and options.depth_channel:
        raise PlanningError("the end-to-end model has no depth channel: plan --e2e and --depth into different plans")
    if options.lsnet and "2d" not in dims:
        raise PlanningError("L-SNet is 2D (slice by slice on 3D data): include 2d in --dims")
    if options.lsnet and options.depth_channel:
        raise PlanningError("L-SNet has no depth channel: plan --lsnet and --depth into different plans")
    fingerprint = object_fingerprint(planner, plans["transpose_forward"]) if options.input_size is None else None
    new: dict[str, dict] = {}
    for d in dims:
        base = configs["3d_fullres" if d == "3d" else "2d"]
        auto = choose_from_objects(planner, base, d, fingerprint, options) if fingerprint is not None else None
        s = auto.s if auto else int(options.input_size)
        coarse_name, fine_name = coarse_config_name(d, s), fine_config_name(d, s)
        coarse, fine, c_spacing = _cascade_pair(planner, base, coarse_name, s, options,
                                                auto.coarse_grid if auto else None)
        crop = CropParams(patch_size=(s,) * 3 if len(base["patch_size"]) == 3 else (1, s, s),
                          **{**(auto.crop if auto else {}), **options.crop})
        coarse["sts"] = StSConfig("coarse", s, coarse_name, options.coarse_trainer,
                                  coarse_resampling=options.coarse_resampling).to_dict()
        fine["sts"] = StSConfig("fine", s, coarse_name, options.coarse_trainer, crop=crop,
                                fallback=options.fallback, **{**(auto.sts_params if auto else {}), **options.sts_params},
                                planning=auto.planning if auto else None).to_dict()
        if auto:
            _log_choices(d, auto, coarse)
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


def _log_choices(dim: str, auto: AutoChoices, coarse: dict) -> None:
    """One line per choice (and given value), then the notes, as the planner decided them."""
    for key, record in auto.planning["chosen"].items():
        print(f"[nnunet-stseg] {dim}: {key} = {record['value']} (chosen: {record['why']})")
    for key, value in auto.planning["given"].items():
        print(f"[nnunet-stseg] {dim}: {key} = {value} (given)")
    patch, shape = [int(v) for v in coarse["patch_size"]], [int(v) for v in coarse["median_image_size_in_voxels"]]
    print(f"[nnunet-stseg] {dim}: coarse network patch {patch} on a median coarse image of {shape}"
          + (" (nnU-Net's sliding window at prediction)" if any(p < m for p, m in zip(patch, shape)) else ""))
    for note in auto.notes:
        print(f"[nnunet-stseg] NOTE {note}")


class StSPlannerMixin:
    """Adds the segment-then-segment configurations to whatever nnU-Net planner it is mixed into.

    Runs that planner's standard planning (so its ``2d``/``3d_fullres`` configurations exist and
    are untouched, and ours get its network class, e.g. the residual encoder U-Net of
    ``nnUNetPlannerResEncM``), then adds ours and saves the plans again under that planner's plans
    identifier. Existing custom configurations in the plans file are kept, as nnU-Net does."""

    def __init__(self, dataset_name_or_id, options: PlanOptions | None = None, **kwargs):
        super().__init__(dataset_name_or_id, **kwargs)
        self.sts_options = options if options is not None else PlanOptions()
        self.sts_configurations: list[str] = []

    def static_estimate_VRAM_usage(self, *args, **kwargs):
        """nnU-Net's estimate (the planner's own method) with the network built on torch's meta
        device: the estimate reads the modules' shapes only, so the number is the same, without
        allocating and initialising the weights (half a second per residual encoder U-Net on 2
        cores, and a 3D plan without ``-s`` builds about 100)."""
        import torch

        with torch.device("meta"):
            return super().static_estimate_VRAM_usage(*args, **kwargs)

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


class nnUNetPlannerStS(StSPlannerMixin, ExperimentPlanner):
    """nnU-Net's default planner plus the segment-then-segment configurations (plans
    ``nnUNetPlans``); :func:`sts_planner_class` gives the same for any other nnU-Net planner."""


def sts_planner_class(planner_name: str = "ExperimentPlanner") -> type:
    """The planner class that adds our configurations to the nnU-Net planner named like
    ``nnUNetv2_plan_experiment -pl`` names it (e.g. ``nnUNetPlannerResEncM``).

    >>> sts_planner_class().__name__, sts_planner_class("nnUNetPlannerResEncM").__name__
    ('nnUNetPlannerStS', 'nnUNetPlannerStS_nnUNetPlannerResEncM')
    """
    if planner_name in ("ExperimentPlanner", "nnUNetPlannerStS"):
        return nnUNetPlannerStS
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    base = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), planner_name,
                                       current_module="nnunetv2.experiment_planning")
    if base is None or not issubclass(base, ExperimentPlanner):
        raise PlanningError(f"no nnU-Net planner named {planner_name!r} (nnUNetv2_plan_experiment -pl takes e.g. "
                            f"ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL)")
    return type(f"nnUNetPlannerStS_{planner_name}", (StSPlannerMixin, base), {"__doc__": StSPlannerMixin.__doc__})
