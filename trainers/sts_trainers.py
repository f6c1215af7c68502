"""nnU-Net trainers for segment-then-segment (run them with the stock ``nnUNetv2_train -tr``).

- :class:`nnUNetTrainer_StSCoarse`: an ordinary nnU-Net trainer for the coarse configuration
  (whole image at reduced resolution); its final validation also reports precision and recall.
- :class:`nnUNetTrainer_StSFine`: trains the fine configuration on crops made from ground-truth
  connected components (squared, padded, jittered, resampled to S) and validates the WHOLE
  cascade with the coarse model of the same fold, so ``summary.json`` holds the pipeline's Dice.

CPU-sized schedules without new classes: the environment variables ``STSEG_NUM_EPOCHS``,
``STSEG_ITERS_PER_EPOCH`` and ``STSEG_VAL_ITERS`` override nnU-Net's 1000 x 250 / 50 (the value
used is written to the training log).
"""
from __future__ import annotations

import os
import sys
from os.path import join

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from threadpoolctl import threadpool_limits
from torch import distributed as dist

from nnunet_stseg.config import StSConfig, grid_spacing3
from nnunet_stseg.geometry import (CropParams, component_boxes, crop_and_resample, fit_to_image, jitter,
                                   square_and_pad, whole_image_boxes)
from nnunet_stseg.metrics import add_precision_recall
from nnunet_stseg.predictor import StSPredictor, adopt_predictor, coarse_model_folder, missing_coarse_message


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {value!r}")
    return v


class _StSScheduleMixin:
    """Applies the STSEG_* schedule overrides after nnU-Net's own __init__."""

    def _apply_schedule_overrides(self) -> None:
        for env, attr in (("STSEG_NUM_EPOCHS", "num_epochs"), ("STSEG_ITERS_PER_EPOCH", "num_iterations_per_epoch"),
                          ("STSEG_VAL_ITERS", "num_val_iterations_per_epoch")):
            v = _env_int(env)
            if v is not None:
                setattr(self, attr, v)


class nnUNetTrainer_StSCoarse(_StSScheduleMixin, nnUNetTrainer):
    """Coarse stage: nnU-Net's trainer on the downsampled whole image."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_schedule_overrides()

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            add_precision_recall(join(self.output_folder, "validation", "summary.json"))


class StSCropDataLoader(nnUNetDataLoader):
    """Samples one fine-stage crop per batch element.

    For each case: pick ONE ground-truth connected component at random (a case without
    foreground is used whole: the whole image, or a random slice for a 2D stage), square + pad
    its box, jitter it, fit it into the image, and resample image (linear) and label (nearest) to
    the loader's patch. The loader's patch may be larger than the network patch (nnU-Net's
    rotation margin); the box is then enlarged about its centre so that nnU-Net's spatial
    augmentation, which keeps the central ``final_patch_size``, ends on exactly the box.

    Randomness comes from numpy's global generator like nnU-Net's own loader, so every DDP rank
    and every augmentation worker draws differently; component boxes are cached per process (no
    state held by one rank only)."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, crop: CropParams,
                 spacing3: list[float], transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.crop = crop
        self.spacing3 = np.asarray(spacing3, dtype=float)
        self.ignore_label = label_manager.ignore_label
        self._box_cache: dict[str, np.ndarray] = {}
        # self.patch_size / final_patch_size are 3-axis here (nnU-Net prepends 1 for 2D)
        self.enlarge = np.asarray(self.patch_size, dtype=float) / np.asarray(self.final_patch_size, dtype=float)

    def _gt_boxes(self, key: str, seg) -> np.ndarray:
        if key not in self._box_cache:
            s = np.asarray(seg[0])
            fg = s > 0
            if self.ignore_label is not None:
                fg &= s != self.ignore_label
            self._box_cache[key] = component_boxes(fg, self.crop.active)[1]
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

    def generate_train_batch(self):
        keys = self.get_indices()
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        data_all = seg_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, _ = self._data.load_case(key)
                shape = tuple(data.shape[1:])
                box = self.sample_box(key, shape, seg, rng)[0].astype(float)
                centre = box.mean(axis=1)
                half = (box[:, 1] - box[:, 0]) * self.enlarge / 2
                box = np.stack([centre - half, centre + half], axis=1)
                img_region, rbox = self._read_region(data, box, shape)
                seg_region, _ = self._read_region(seg, box, shape)
                img = crop_and_resample(torch.from_numpy(img_region.astype(np.float32)), rbox[None],
                                        self.patch_size, "linear", padding_mode="zeros")[0]
                lab = crop_and_resample(torch.from_numpy(seg_region.astype(np.float32)), rbox[None],
                                        self.patch_size, "nearest", padding_mode="zeros")[0]
                lab = lab.round().to(torch.int16)
                if self.patch_size_was_2d:
                    img, lab = img[:, 0], lab[:, 0]
                if self.transforms is not None:
                    out = self.transforms(image=img, segmentation=lab)
                    img, lab = out["image"], out["segmentation"]
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *img.shape), dtype=torch.float32)
                data_all[j] = img
                if isinstance(lab, list):
                    if seg_all is None:
                        seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in lab]
                    for s_idx, s in enumerate(lab):
                        seg_all[s_idx][j] = s
                else:
                    if seg_all is None:
                        seg_all = torch.empty((self.batch_size, *lab.shape), dtype=lab.dtype)
                    seg_all[j] = lab
        return {"data": data_all, "target": seg_all, "keys": keys}


class nnUNetTrainer_StSFine(_StSScheduleMixin, nnUNetTrainer):
    """Fine stage: trains on ground-truth component crops, validates the whole cascade."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sts = StSConfig.from_configuration(self.configuration_manager.configuration,
                                                f"configuration '{configuration}'")
        if self.sts.role != "fine":
            raise ValueError(f"{self.__class__.__name__} trains the fine configuration; '{configuration}' is the "
                             f"{self.sts.role} one (train it with {self.sts.coarse_trainer})")
        self._apply_schedule_overrides()

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        # nnU-Net's predictor calls this while loading our model: turn it into the cascade predictor
        adopt_predictor(sys._getframe(1))
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def _spacing3(self) -> list[float]:
        return grid_spacing3(self.configuration_manager.spacing)

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        label_kwargs = dict(is_cascaded=False, foreground_labels=lm.foreground_labels,
                            regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
        tr_transforms = self.get_training_transforms(patch, rotation, ds_scales, mirror_axes, dummy_2d,
                                                     use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
                                                     **label_kwargs)
        val_transforms = self.get_validation_transforms(ds_scales, **label_kwargs)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = StSCropDataLoader(dataset_tr, self.batch_size, initial_patch, patch, lm, self.sts.crop,
                                  self._spacing3(), transforms=tr_transforms)
        dl_val = StSCropDataLoader(dataset_val, self.batch_size, patch, patch, lm, self.sts.crop,
                                   self._spacing3(), transforms=val_transforms)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            gen_tr = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=n_proc,
                                                  num_cached=max(6, n_proc // 2), seeds=None, pin_memory=pin,
                                                  wait_time=0.002)
            gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None,
                                                   num_processes=max(1, n_proc // 2),
                                                   num_cached=max(3, n_proc // 4), seeds=None, pin_memory=pin,
                                                   wait_time=0.002)
        next(gen_tr), next(gen_val)
        return gen_tr, gen_val

    def on_train_start(self):
        if not os.path.isdir(os.path.join(self.coarse_folder(), f"fold_{self.fold}")):
            message = missing_coarse_message(self.coarse_folder(), self.plans_manager.dataset_name,
                                             self.plans_manager.plans_name, self.sts, self.fold)
            self.print_to_log_file(f"WARNING: {message}. Training the fine stage works without it; its final "
                                   f"validation runs the whole cascade and needs it.", also_print_to_console=True)
        super().on_train_start()

    def coarse_folder(self) -> str:
        return coarse_model_folder(str(nnUNet_results), self.plans_manager.dataset_name,
                                   self.plans_manager.plans_name, self.sts)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Run the whole cascade (coarse model of this fold -> crops -> this network) on the fold's
        validation cases and score it against the full-resolution ground truth."""
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = StSPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                 perform_everything_on_device=True, device=self.device, verbose=False,
                                 allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        try:
            predictor.attach_coarse([self.fold])
        except FileNotFoundError as e:
            # the fine checkpoint is already saved; say how to validate later instead of crashing
            self.print_to_log_file(f"Cascade validation SKIPPED: {e}. Then re-run only the validation with "
                                   f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} "
                                   f"{self.fold} -tr {self.__class__.__name__} --val", also_print_to_console=True)
            self.set_deep_supervision_enabled(True)
            return
        out_dir = join(self.output_folder, "validation")
        maybe_mkdir_p(out_dir)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        for k in dataset_val.identifiers:
            data, _, _, properties = dataset_val.load_case(k)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data[:])))
            export_prediction_from_logits(logits, properties, self.configuration_manager, self.plans_manager,
                                          self.dataset_json, join(out_dir, k), save_probabilities)
            self.print_to_log_file(f"cascade validation {k}: {predictor.last_timings}")
        if self.is_ddp:
            dist.barrier()
        if self.local_rank == 0:
            lm = self.label_manager
            metrics = compute_metrics_on_folder(
                join(self.preprocessed_dataset_folder_base, "gt_segmentations"), out_dir,
                join(out_dir, "summary.json"), self.plans_manager.image_reader_writer_class(),
                self.dataset_json["file_ending"], lm.foreground_regions if lm.has_regions else lm.foreground_labels,
                lm.ignore_label, chill=True, num_processes=default_num_processes)
            metrics = add_precision_recall(join(out_dir, "summary.json"))
            fm = metrics["foreground_mean"]
            self.print_to_log_file("Cascade validation complete (coarse fold model + fine crops)",
                                   also_print_to_console=True)
            self.print_to_log_file(f"Mean Validation Dice: {fm['Dice']:.4f}, precision {fm['Precision']:.4f}, "
                                   f"recall {fm['Recall']:.4f}", also_print_to_console=True)
        self.set_deep_supervision_enabled(True)


__all__ = ["nnUNetTrainer_StSCoarse", "nnUNetTrainer_StSFine", "StSCropDataLoader"]
