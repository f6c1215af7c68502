"""The skeleton every final validation of ours shares: a predictor for the trained network, the
fold's validation cases split over DDP ranks like nnU-Net's, each case loaded (with the depth
channel when the model has one), and the per-rank results brought together on rank 0.

A trainer's ``perform_actual_validation`` keeps only what it does with each case (export and score
a segmentation; match heatmap peaks) and what it writes.
"""
from __future__ import annotations

from os.path import join
from typing import Iterator

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import distributed as dist

from nnunet_stseg.core.depth import append_depth_channel, depths_from_properties
from nnunet_stseg.core.metrics import add_precision_recall


def add_depth_to_case(data, properties: dict, slice_axis: int):
    """A preprocessed case (C, Z, ...) with its depth channel, as the depth predictor's preprocessing
    makes it (for code that feeds preprocessed training data to a predictor); ``slice_axis`` is the
    plans' ``transpose_forward[0]``."""
    case = data if isinstance(data, torch.Tensor) else np.asarray(data[:])
    return append_depth_channel(case, depths_from_properties(case.shape[1], properties, slice_axis=slice_axis))


def validation_predictor(trainer, predictor_class: type = nnUNetPredictor, depth: bool = False):
    """A predictor of ``predictor_class`` holding the trainer's network in eval mode (deep
    supervision off), nnU-Net's validation settings, the trainer's mirroring axes. Without axes
    (``STSEG_VAL_MIRRORING=0``, or a trainer that never mirrors) mirroring is off for the whole
    validation: the companion models our predictors load (coarse, centre) inherit the setting."""
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    mirroring = trainer.inference_allowed_mirroring_axes is not None
    predictor = predictor_class(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                allow_tqdm=False)
    if hasattr(predictor, "enable_depth_channel"):
        predictor.enable_depth_channel(depth)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def validation_cases(trainer, depth: bool = False) -> Iterator[tuple[str, torch.Tensor, np.ndarray, dict]]:
    """This rank's share of the fold's validation cases (nnU-Net's DDP split), one at a time:
    ``(key, data, seg, properties)`` with ``data`` a tensor (with the depth channel if ``depth``)."""
    _, val_keys = trainer.do_split()
    if trainer.is_ddp:
        val_keys = val_keys[trainer.local_rank::dist.get_world_size()]
    dataset_val = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys)
    for key in dataset_val.identifiers:
        data, seg, _, properties = dataset_val.load_case(key)
        data = (add_depth_to_case(data, properties, trainer.plans_manager.transpose_forward[0]) if depth
                else np.asarray(data[:]))
        yield key, torch.as_tensor(data), np.asarray(seg), properties


def validate_whole_model(trainer, predictor, what: str, save_probabilities: bool = False, case_log=None,
                         done: str | None = None) -> None:
    """The final validation of a model whose predictor turns a full-resolution case into logits
    (the cascade, the end-to-end model): each of this rank's validation cases through
    ``predictor.predict_logits_from_preprocessed_data``, exported with nnU-Net's own export into
    ``validation/``, scored on rank 0 with nnU-Net's metrics against the full-resolution ground
    truth, precision and recall added to ``summary.json``, the mean printed. ``case_log(key)``
    (optional) returns a line logged after each case; ``done`` replaces the closing line."""
    depth = getattr(predictor, "depth_channel", False)
    out_dir = join(trainer.output_folder, "validation")
    maybe_mkdir_p(out_dir)
    for k, data, _, properties in validation_cases(trainer, depth):
        logits = predictor.predict_logits_from_preprocessed_data(data)
        export_prediction_from_logits(logits, properties, trainer.configuration_manager, trainer.plans_manager,
                                      trainer.dataset_json, join(out_dir, k), save_probabilities)
        if case_log is not None:
            trainer.print_to_log_file(f"{what.lower()} validation {k}: {case_log(k)}")
    if trainer.is_ddp:
        dist.barrier()
    if trainer.local_rank == 0:
        lm = trainer.label_manager
        compute_metrics_on_folder(
            join(trainer.preprocessed_dataset_folder_base, "gt_segmentations"), out_dir,
            join(out_dir, "summary.json"), trainer.plans_manager.image_reader_writer_class(),
            trainer.dataset_json["file_ending"], lm.foreground_regions if lm.has_regions else lm.foreground_labels,
            lm.ignore_label, chill=True, num_processes=default_num_processes)
        fm = add_precision_recall(join(out_dir, "summary.json"))["foreground_mean"]
        trainer.print_to_log_file(done or f"{what} validation complete", also_print_to_console=True)
        trainer.print_to_log_file(f"Mean Validation Dice: {fm['Dice']:.4f}, precision {fm['Precision']:.4f}, "
                                  f"recall {fm['Recall']:.4f}", also_print_to_console=True)


def gather_on_rank0(trainer, per_case: dict) -> dict | None:
    """All ranks' ``per_case`` results merged on rank 0 (None on the other ranks); a barrier
    without DDP is a no-op."""
    if not trainer.is_ddp:
        return per_case
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_case)
    return {k: v for part in gathered for k, v in part.items()} if trainer.local_rank == 0 else None


__all__ = ["add_depth_to_case", "validation_predictor", "validation_cases", "gather_on_rank0"]
