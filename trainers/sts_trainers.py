"""nnU-Net trainers for segment-then-segment (run them with the stock ``nnUNetv2_train -tr``).

- :class:`nnUNetTrainer_StSCoarse`: an ordinary nnU-Net trainer for the coarse configuration
  (whole image at reduced resolution); its final validation also reports precision and recall. It
  refuses data that reached the coarse grid by another resampling than the one the predictor uses
  (``sts.coarse_resampling``: data made by ``nnUNetv2_preprocess`` instead of ``nnunet-stseg plan``).
- :class:`nnUNetTrainer_StSFine`: trains the fine configuration on crops made from ground-truth
  connected components (squared, padded, jittered, resampled to S) and validates the WHOLE
  cascade with the coarse model of the same fold, so ``summary.json`` holds the pipeline's Dice.

CPU-sized schedules without new classes: the environment variables ``STSEG_NUM_EPOCHS``,
``STSEG_ITERS_PER_EPOCH`` and ``STSEG_VAL_ITERS`` override nnU-Net's 1000 x 250 / 50 (the value
used is written to the training log); ``STSEG_SAVE_EVERY`` overrides how often (epochs) the
resumable ``checkpoint_latest.pth`` is written (nnU-Net: 50). ``STSEG_SKIP_VALIDATION=1`` skips the
final validation after training (for experiments that predict the held-out cases themselves: a 3D
validation with nnU-Net's mirroring is 8 sliding-window passes per case, hours on a CPU); run
``nnUNetv2_train ... --val`` without it to make the validation later. ``STSEG_VAL_MIRRORING=0``
makes the final validation without mirroring (what ``nnUNetv2_predict --disable_tta`` does for
prediction: one network pass per window instead of 2^d); the checkpoint keeps its mirroring axes,
so later predictions still mirror. ``STSEG_PATIENCE=N`` trains to a validation plateau: training
stops once the monitored validation value (the validation loss; the size trainer's size phase: the
validation size error) has not improved for N epochs (``STSEG_NUM_EPOCHS`` is then the most it may
run), and ``checkpoint_best.pth`` is the best epoch by that value instead of nnU-Net's EMA Dice.
"""
from __future__ import annotations

import functools
import json
import math
import os
from glob import glob
from os.path import join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_stseg import settings
from nnunet_stseg.adapters.bundle import embed_companions
from nnunet_stseg.adapters.config import StSConfig, grid_spacing3
from nnunet_stseg.adapters.inference_io import COARSE_RESAMPLING_KEY, coarse_resampling_of
from nnunet_stseg.adapters.nnunet_hooks import pools_in_this_process
from nnunet_stseg.adapters.predictor import StSPredictor, missing_coarse_message
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.geometry import (CropParams, component_boxes, crop_and_resample, fit_to_image, jitter,
                                        sample_negative_box, smallest_crop_size, square_and_pad, whole_image_boxes)
from nnunet_stseg.core.metrics import add_precision_recall
from nnunet_stseg.core.plateau import best_epoch, plateau_reached
from nnunet_stseg.trainers.depth_channel import DepthChannelTrainerMixin
from nnunet_stseg.trainers.loaders import ResampledSampleLoader, build_dataloaders
from nnunet_stseg.trainers.validation import validate_whole_model, validation_predictor

SCHEDULE_FILE = "nnunet_stseg_schedule.json"
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")


class PlateauReached(Exception):
    """Raised at the end of an epoch (or at the start of a resumed training) when the validation
    plateau rule of ``STSEG_PATIENCE`` says stop; :meth:`_StSScheduleMixin.run_training` ends the
    training as nnU-Net ends it after its last epoch."""


class _StSScheduleMixin:
    """Applies the STSEG_* schedule overrides after nnU-Net's own __init__, keeps a resumed
    training on the schedule it was started with, stops at a validation plateau when asked, and
    writes checkpoints atomically (an interrupted save never leaves a truncated checkpoint for
    ``--c`` to load)."""

    patience: int | None = None  # STSEG_PATIENCE: epochs without improvement before training stops

    def schedule(self) -> dict:
        """The effective schedule (nnU-Net's defaults or the STSEG_* values)."""
        out = {k: int(getattr(self, k)) for k in SCHEDULE_KEYS}
        if self.patience:
            out["patience"] = int(self.patience)
        return out

    def monitored_values(self, last_epoch: int) -> tuple[str, list[float]]:
        """What the plateau rule watches: (name, one value per epoch of the current phase up to
        ``last_epoch``; lower is better). Here nnU-Net's validation loss; the size trainer watches
        its validation size error in the size phase."""
        return "validation loss", [float(v) for v in self.logger.get_value("val_losses", None)[:last_epoch + 1]]

    def on_train_start(self):
        self._check_schedule_record()
        super().on_train_start()
        if self.patience and self._plateau_reached(*self.monitored_values(self.current_epoch - 1)):
            raise PlateauReached  # a resumed training (--c) that had already stopped

    def _plateau_reached(self, name: str, values: list[float]) -> bool:
        if not values or not plateau_reached(values, self.patience):
            return False
        best = best_epoch(values)
        self.print_to_log_file(f"validation plateau: the {name} has not improved for {self.patience} epochs (best "
                               + (f"{values[best]:.4f}, {len(values) - 1 - best} epochs ago" if best is not None
                                  else "none finite") + "); training stops, checkpoint_best.pth holds the best epoch")
        return True

    def on_epoch_end(self):
        if not self.patience:
            return super().on_epoch_end()
        name, values = self.monitored_values(self.current_epoch)
        if values and best_epoch(values) == len(values) - 1:
            self.print_to_log_file(f"new best {name}: {values[-1]:.4f} (checkpoint_best.pth)")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        self._best_ema = math.inf  # nnU-Net's EMA-Dice rule must not replace the plateau rule's best checkpoint
        super().on_epoch_end()
        if self._plateau_reached(name, values):
            raise PlateauReached

    def run_training(self):
        try:
            super().run_training()
        except PlateauReached:
            self.on_train_end()

    def _check_schedule_record(self) -> None:
        """A fresh training records its schedule in the fold folder; a resumed one (``--c``) must
        run the same, or stop with an error naming both: with the STSEG_* variables a smoke run and
        a real run can share one results folder, and ``--c`` in another shell would otherwise
        silently change the schedule (nnU-Net's own convention, a trainer class per schedule, makes
        that impossible; the record gives the same guarantee)."""
        path = os.path.join(self.output_folder, SCHEDULE_FILE)
        current = self.schedule()
        if self.current_epoch > 0 and os.path.isfile(path):
            with open(path) as f:
                recorded = json.load(f)
            if recorded.get("schedule") != current:
                raise RuntimeError(
                    f"{self.output_folder} was started with the schedule {recorded.get('schedule')} (environment "
                    f"{recorded.get('variables') or 'none'}); this run would continue it with {current} (environment "
                    f"{settings.schedule_settings() or 'none'}). Set the same STSEG_* variables to continue it, or "
                    f"train into another results folder (nnUNet_results) for the new schedule.")
            return
        if self.local_rank == 0:
            if self.current_epoch > 0:
                self.print_to_log_file(f"no schedule record from the start of this training; recording {current}")
            os.makedirs(self.output_folder, exist_ok=True)
            write_json_atomic({"schedule": current, "variables": settings.schedule_settings()}, path)

    def _apply_schedule_overrides(self) -> None:
        used = settings.schedule_settings()  # read (and checked) once
        for name, attr in (("STSEG_NUM_EPOCHS", "num_epochs"), ("STSEG_ITERS_PER_EPOCH", "num_iterations_per_epoch"),
                           ("STSEG_VAL_ITERS", "num_val_iterations_per_epoch"), ("STSEG_SAVE_EVERY", "save_every"),
                           ("STSEG_PATIENCE", "patience")):
            if name in used:
                setattr(self, attr, used[name])
        if used:
            self.print_to_log_file("nnunet-stseg settings from the environment: " + ", ".join(
                f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in used.items()))
        # instance attributes: they shadow every subclass's validation, ours and nnU-Net's
        if used.get("STSEG_SKIP_VALIDATION") is True:
            self.perform_actual_validation = self._skipped_validation
        else:
            self.perform_actual_validation = functools.partial(
                self._final_validation, mirroring=used.get("STSEG_VAL_MIRRORING") is not False)

    def _skipped_validation(self, save_probabilities: bool = False) -> None:
        self.print_to_log_file("final validation skipped (STSEG_SKIP_VALIDATION=1); run nnUNetv2_train with "
                               "--val and without that variable to make it")

    def _final_validation(self, save_probabilities: bool = False, mirroring: bool = True):
        """The class's own final validation (ours or nnU-Net's), with the mirroring axes switched
        off for its duration when ``mirroring`` is False (STSEG_VAL_MIRRORING=0: every validation
        hands them to its predictor); with ``nnUNet_def_n_proc=1`` nnU-Net's export and metrics
        pools are one thread of this process (``nnunet_hooks.pools_in_this_process``)."""
        with pools_in_this_process(default_num_processes):
            if mirroring:
                return type(self).perform_actual_validation(self, save_probabilities)
            self.print_to_log_file("final validation without mirroring (STSEG_VAL_MIRRORING=0)")
            axes, self.inference_allowed_mirroring_axes = self.inference_allowed_mirroring_axes, None
            try:
                return type(self).perform_actual_validation(self, save_probabilities)
            finally:
                self.inference_allowed_mirroring_axes = axes

    def save_checkpoint(self, filename: str) -> None:
        folder, name = os.path.split(filename)
        tmp = os.path.join(folder, f".tmp_{name}")
        super().save_checkpoint(tmp)
        if os.path.isfile(tmp):  # nnU-Net saves on rank 0 only, unless checkpointing is disabled
            os.replace(tmp, filename)


class nnUNetTrainer_StSCoarse(_StSScheduleMixin, DepthChannelTrainerMixin, nnUNetTrainer):
    """Coarse stage: nnU-Net's trainer on the downsampled whole image (with the depth channel if
    the configuration asks for it)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_schedule_overrides()
        self._check_depth_channel()

    def on_train_start(self):
        self._check_coarse_resampling()
        super().on_train_start()

    def _check_coarse_resampling(self) -> None:
        """The coarse model must be trained on images made like the ones it will predict: the plans'
        ``sts.coarse_resampling`` against what the preprocessed cases record (one case read)."""
        wanted = coarse_resampling_of(self.configuration_manager.configuration)
        cases = sorted(glob(join(self.preprocessed_dataset_folder, "*.pkl")))
        if wanted is None or not cases:
            return
        found = load_pickle(cases[0]).get(COARSE_RESAMPLING_KEY, "nnunet")
        if found != wanted:
            raise RuntimeError(
                f"{self.preprocessed_dataset_folder} was resampled to the coarse grid by "
                f"{'nnU-Net' if found == 'nnunet' else found} (e.g. nnUNetv2_preprocess), but the plans' "
                f"sts.coarse_resampling is {wanted!r}: the coarse model would learn from other images than it "
                f"predicts. Preprocess it with `nnunet-stseg plan -d {self.plans_manager.dataset_name} "
                f"-s {self.configuration_manager.configuration['sts']['input_size']}` and the options it was planned "
                f"with, or plan with --coarse_resampling {found}")
        self.print_to_log_file(f"coarse images resampled by: {found} (sts.coarse_resampling)")

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            add_precision_recall(join(self.output_folder, "validation", "summary.json"))


class nnUNetTrainer_Depth(nnUNetTrainer_StSCoarse):
    """nnU-Net's 2d configuration on 3D scans with the depth channel: every slice gets one extra
    input channel holding its normalised depth in the whole scan (0 first slice, 1 last). Run it on
    any 2D configuration of a 3D dataset (``2d``, ``2d_sts_coarse_<S>``); prediction with the stock
    ``nnUNetv2_predict -tr nnUNetTrainer_Depth`` adds the same channel."""

    depth_channel_default = True


class StSCropDataLoader(ResampledSampleLoader):
    """Samples one fine-stage crop per batch element.

    For each case: pick ONE ground-truth connected component at random (a case without
    foreground is used whole: the whole image, or a random slice for a 2D stage), square + pad
    its box, jitter it, fit it into the image, and resample image (linear) and label (nearest) to
    the loader's patch. With ``crop.negative_fraction`` > 0, that fraction of the samples of
    cases with objects is a negative crop instead: sized like the case's object crops (smaller after
    each draw that does not fit, down to the crop of the smallest object the size rule keeps),
    placed where the label (read over the whole enlarged region) has no foreground
    (:func:`~nnunet_stseg.core.geometry.sample_negative_box`); when none fits after 20 draws the
    sample is an object crop. The loader's patch may be larger than the network patch (nnU-Net's
    rotation margin); the box is then enlarged about its centre so that nnU-Net's spatial
    augmentation, which keeps the central ``final_patch_size``, ends on exactly the box.
    Component boxes are cached per process (no state held by one rank only)."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, crop: CropParams,
                 spacing3: list[float], transforms=None, depth_slice_axis: int | None = None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, transforms=transforms,
                         depth_slice_axis=depth_slice_axis)
        self.crop = crop
        self.spacing3 = np.asarray(spacing3, dtype=float)
        self.negative_floor = smallest_crop_size(self.spacing3, crop)  # the smallest negative crop
        self._box_cache: dict[str, np.ndarray] = {}
        # self.patch_size / final_patch_size are 3-axis here (nnU-Net prepends 1 for 2D)
        self.enlarge = np.asarray(self.patch_size, dtype=float) / np.asarray(self.final_patch_size, dtype=float)

    def _gt_boxes(self, key: str, seg) -> np.ndarray:
        if key not in self._box_cache:
            self._box_cache[key] = component_boxes(self.foreground(seg), self.crop.active)[1]
        return self._box_cache[key]

    def sample_box(self, key: str, shape: tuple[int, ...], seg, rng: np.random.Generator) -> np.ndarray:
        """One training box (1, 3, 2) for a case, before the rotation-margin enlargement."""
        boxes = self._gt_boxes(key, seg)
        if len(boxes) == 0:
            whole = whole_image_boxes(shape, self.crop.active)
            return whole[rng.integers(len(whole))][None]
        box = boxes[rng.integers(len(boxes))][None]
        centre, size = square_and_pad(box, self.spacing3, self.crop)
        centre, size = jitter(centre, size, shape, self.crop, rng)
        return fit_to_image(centre, size, shape)

    def _read_region(self, arr, box: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
        """Read only the voxels a (possibly enlarged) box needs, plus one voxel for interpolation,
        from the memory-mapped case; returns the region and the box in region coordinates."""
        lo = np.clip(np.floor(box[:, 0]).astype(int) - 1, 0, np.asarray(shape))
        hi = np.clip(np.ceil(box[:, 1]).astype(int) + 1, 0, np.asarray(shape))
        hi = np.maximum(hi, lo + 1)
        region = np.asarray(arr[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))])
        return region, box - lo[:, None]

    def _enlarged(self, box: np.ndarray) -> np.ndarray:
        """The box enlarged about its centre by the rotation margin (what is actually read)."""
        box = np.asarray(box, dtype=float)
        centre = box.mean(axis=1)
        half = (box[:, 1] - box[:, 0]) * self.enlarge / 2
        return np.stack([centre - half, centre + half], axis=1)

    def sample_negative(self, key: str, shape: tuple[int, ...], seg, rng: np.random.Generator) -> np.ndarray | None:
        """One negative box (1, 3, 2) of a case with objects, or None (see the class docstring)."""
        boxes = self._gt_boxes(key, seg)
        if len(boxes) == 0:
            return None
        _, sizes = square_and_pad(boxes, self.spacing3, self.crop)

        def is_free(box: np.ndarray) -> bool:
            region, _ = self._read_region(seg, self._enlarged(box), shape)
            return not self.foreground(region).any()

        box = sample_negative_box(shape, sizes, self.crop.active, is_free, rng, min_size=self.negative_floor)
        return None if box is None else box[None]

    def make_sample(self, key, data, seg, properties, rng):
        shape = tuple(data.shape[1:])
        box = None
        if self.crop.negative_fraction > 0 and rng.random() < self.crop.negative_fraction:
            box = self.sample_negative(key, shape, seg, rng)
        if box is None:
            box = self.sample_box(key, shape, seg, rng)
        box = box[0].astype(float)
        slice_index = int(np.floor(box[0, 0]))
        box = self._enlarged(box)
        img_region, rbox = self._read_region(data, box, shape)
        seg_region, _ = self._read_region(seg, box, shape)
        img = crop_and_resample(torch.from_numpy(img_region.astype(np.float32)), rbox[None],
                                self.patch_size, "linear", padding_mode="zeros")[0]
        lab = crop_and_resample(torch.from_numpy(seg_region.astype(np.float32)), rbox[None],
                                self.patch_size, "nearest", padding_mode="zeros")[0]
        return img, lab.round().to(torch.int16), slice_index


class nnUNetTrainer_StSFine(_StSScheduleMixin, DepthChannelTrainerMixin, nnUNetTrainer):
    """Fine stage: trains on ground-truth component crops, validates the whole cascade."""

    predictor_class = StSPredictor
    sts_role = "fine"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sts = StSConfig.for_role(self.configuration_manager.configuration, self.sts_role,
                                      f"configuration '{configuration}'", self.__class__.__name__)
        self._apply_schedule_overrides()
        self._check_depth_channel()

    def _spacing3(self) -> list[float]:
        return grid_spacing3(self.configuration_manager.spacing)

    def get_dataloaders(self):
        crop = self.sts.crop
        self.print_to_log_file(
            f"fine-stage crops: {crop.negative_fraction:g} of the samples of cases with objects drawn where there is "
            f"no object (sts.crop.negative_fraction); proposals at prediction: "
            + ("coarse argmax components only" if crop.proposal_threshold is None else
               f"also coarse regions with foreground probability >= {crop.proposal_threshold:g}"))
        return build_dataloaders(self, lambda dataset, patch, final_patch, transforms, train: StSCropDataLoader(
            dataset, self.batch_size, patch, final_patch, self.label_manager, self.sts.crop, self._spacing3(),
            transforms=transforms, depth_slice_axis=self.depth_slice_axis()))

    def on_train_start(self):
        coarse_folder = self.coarse_folder()
        if not os.path.isdir(os.path.join(coarse_folder, f"fold_{self.fold}")):
            message = missing_coarse_message(coarse_folder, self.plans_manager.dataset_name,
                                             self.plans_manager.plans_name, self.sts, self.fold)
            self.print_to_log_file(f"WARNING: {message}. Training the fine stage works without it; its final "
                                   f"validation runs the whole cascade and needs it.", also_print_to_console=True)
        super().on_train_start()

    def coarse_folder(self) -> str:
        return str(model_folder(self.plans_manager.dataset_name, self.sts.coarse_trainer,
                                self.sts.coarse_configuration, self.plans_manager.plans_name))

    def companion_folders(self) -> dict[str, str]:
        """The models prediction needs besides this one (name -> model folder), embedded in this
        fold's final and best checkpoints at the end of training."""
        return {"coarse": self.coarse_folder()}

    def companion_required(self, name: str) -> bool:
        """Whether prediction with this model's plans needs companion ``name`` (a missing one is
        then said on the console, not only in the log)."""
        return True

    def on_train_end(self):
        super().on_train_end()
        self.embed_companions()

    def embed_companions(self) -> None:
        """Copy this fold of every companion model into ``checkpoint_final.pth`` and
        ``checkpoint_best.pth`` (:mod:`nnunet_stseg.adapters.bundle`), so that this model folder,
        exported with ``nnUNetv2_export_model_to_zip``, predicts on its own."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        companions = self.companion_folders()
        done = set()
        for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
            done.update(embed_companions(join(self.output_folder, name), companions, self.fold))
        for name in sorted(companions):
            if name in done:
                self.print_to_log_file(f"{name} model fold {self.fold} ({companions[name]}) embedded in this fold's "
                                       f"checkpoints: this model folder predicts on its own")
            else:
                self.print_to_log_file(
                    f"{name} model fold {self.fold} not found in {companions[name]}: not embedded. Prediction looks "
                    f"for it there; once it is trained, `nnunet-stseg bundle -m {self.output_folder_base}` embeds it",
                    also_print_to_console=self.companion_required(name))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Run the whole cascade (coarse model of this fold -> crops -> this network) on the fold's
        validation cases and score it against the full-resolution ground truth."""
        depth = self.uses_depth_channel(self.configuration_manager)
        predictor = validation_predictor(self, self.predictor_class, depth)
        try:
            predictor.attach_coarse([self.fold])
        except FileNotFoundError as e:
            # the fine checkpoint is already saved; say how to validate later instead of crashing
            self.print_to_log_file(f"Cascade validation SKIPPED: {e}. Then re-run only the validation with "
                                   f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} "
                                   f"{self.fold} -tr {self.__class__.__name__} --val", also_print_to_console=True)
            self.set_deep_supervision_enabled(True)
            return
        validate_whole_model(self, predictor, "Cascade", save_probabilities,
                             case_log=lambda k: predictor.last_timings,
                             done=f"Cascade validation complete (coarse fold model + {self.sts_role} stage)")
        self.set_deep_supervision_enabled(True)


__all__ = ["nnUNetTrainer_StSCoarse", "nnUNetTrainer_StSFine", "nnUNetTrainer_Depth", "StSCropDataLoader"]
