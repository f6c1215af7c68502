"""nnU-Net trainer that learns from a few pixel labels and many object sizes (seed 004; methods.md
section 6; dataset convention in :mod:`nnunet_stseg.adapters.size_labels`).

    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainer_StSSizes

Phase 1 (``sts.sizes.pretrain_epochs``): nnU-Net's own training on the pixel-labelled cases of the
fold. Phase 2: every step also takes ``size_batch_size`` images with a known size (the size-only
cases and the pixel-labelled training cases ``object_sizes.json`` lists: the paper's phase 2 runs
over the whole training set; whole images, only size-keeping flips), samples a binary mask from
the network's foreground probabilities, and adds the single-sample estimate of the expected
squared size error's gradient (:func:`nnunet_stseg.core.sizes.size_loss_gradient`) to nnU-Net's
pixel loss on the labelled batch; both batches go through the network in one pass. The network is an ordinary nnU-Net
network: ``nnUNetv2_predict`` runs it. Per epoch the phase, its time and the size error of the
argmax prediction on the size batch, and the size error E on the validation batches (the
paper's validation E) are written to ``size_training.json`` in the fold folder. With
``STSEG_PATIENCE`` the size phase stops when E stops improving, as in the paper.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from os.path import join
from pathlib import Path

import numpy as np
import torch
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_stseg.adapters.config import SizeParams
from nnunet_stseg.adapters.size_labels import SIZES_FILE, SizeLabelError, binary_labels, in_plane_spacing, read_sizes
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.metrics import add_precision_recall
from nnunet_stseg.core.sizes import object_size, size_loss_gradient, squared_size_error
from nnunet_stseg.trainers.sts_trainers import _StSScheduleMixin

LOG_FILE = "size_training.json"


class SizeBatches:
    """Batches of whole images with a known size, padded to the patch: image (B, C, H, W) float32,
    a mask of the real image (B, H, W) bool (padding is background), target sizes in pixels (B,)."""

    def __init__(self, cases: dict[str, tuple[np.ndarray, float]], patch: tuple[int, int], batch_size: int,
                 mirror: bool, seed: int | None = None):
        self.cases, self.keys = cases, sorted(cases)
        self.patch, self.batch_size, self.mirror = tuple(int(p) for p in patch), int(batch_size), mirror
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = self.rng.choice(len(self.keys), self.batch_size, replace=True)
        first = self.cases[self.keys[keys[0]]][0]
        images = np.zeros((self.batch_size, first.shape[0], *self.patch), dtype=np.float32)
        valid = np.zeros((self.batch_size, *self.patch), dtype=bool)
        sizes = np.zeros(self.batch_size, dtype=np.float32)
        for j, k in enumerate(keys):
            image, size = self.cases[self.keys[k]]
            if self.mirror:
                for axis in (1, 2):
                    if self.rng.random() < 0.5:
                        image = np.flip(image, axis)
            h, w = image.shape[1:]
            y0, x0 = (self.patch[0] - h) // 2, (self.patch[1] - w) // 2
            images[j, :, y0:y0 + h, x0:x0 + w] = image
            valid[j, y0:y0 + h, x0:x0 + w] = True
            sizes[j] = size
        return torch.from_numpy(images), torch.from_numpy(valid), torch.from_numpy(sizes)


class nnUNetTrainer_StSSizes(_StSScheduleMixin, nnUNetTrainer):
    """nnU-Net's trainer plus the size loss on the cases with a known size (phase 2); see the module
    docstring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_schedule_overrides()
        where = f"configuration {configuration} of {plans.get('plans_name', 'the plans')}"
        self.size_params = SizeParams.from_configuration(self.configuration_manager.configuration, where)
        if self.size_params.initial_lr is not None:  # read by nnU-Net's configure_optimizers at the start
            self.initial_lr = float(self.size_params.initial_lr)
        self.foreground_value, self.ignore_value = binary_labels(dataset_json, "dataset.json")
        self.size_cases: dict[str, tuple[np.ndarray, float]] = {}
        self.size_batches: SizeBatches | None = None
        self._epoch_record: dict = {}
        self._val_size_errors: list[float] = []

    # ------------------------------------------------------------------ setup
    @property
    def pretrain_epochs(self) -> int:
        p = self.size_params.pretrain_epochs
        return int(self.num_epochs) // 2 if p is None else int(p)

    def in_size_phase(self) -> bool:
        return self.current_epoch >= self.pretrain_epochs and self.size_params.size_weight > 0 \
            and self.size_batches is not None

    def sizes_file(self) -> str:
        """``object_sizes.json`` of the preprocessed dataset, else of the raw dataset."""
        for base in (self.preprocessed_dataset_folder_base,
                     join(nnUNet_raw, self.plans_manager.dataset_name) if nnUNet_raw else None):
            if base and os.path.isfile(join(base, SIZES_FILE)):
                return join(base, SIZES_FILE)
        raise SizeLabelError(f"{SIZES_FILE} of {self.plans_manager.dataset_name} not found in "
                             f"{self.preprocessed_dataset_folder_base} or its nnUNet_raw folder")

    def do_split(self):
        """nnU-Net's split, with the size-only cases (all ``ignore``, listed in ``object_sizes.json``)
        taken out of the pixel training set and out of the validation set; every training case with
        a size (size-only or pixel-labelled) is loaded for the size loss."""
        tr_keys, val_keys = super().do_split()
        sizes_mm = read_sizes(os.path.dirname(self.sizes_file()))
        where = f"configuration {self.configuration_name}"
        if len(self.configuration_manager.patch_size) != 2:
            raise SizeLabelError(f"{where}: size supervision needs a 2D configuration, got patch "
                                 f"{self.configuration_manager.patch_size}")
        pixel_mm = in_plane_spacing(self.configuration_manager.spacing, where)
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        listed = [k for k in tr_keys if k in sizes_mm]
        dataset = self.dataset_class(self.preprocessed_dataset_folder, listed)
        patch = tuple(int(p) for p in self.configuration_manager.patch_size)
        size_cases, size_only = {}, set()
        for key in listed:
            data, seg, _, _ = dataset.load_case(key)
            image = np.asarray(data)[:, 0].astype(np.float32)  # (C, 1, H, W) -> (C, H, W)
            if data.shape[1] != 1 or any(s > p for s, p in zip(image.shape[1:], patch)):
                raise SizeLabelError(f"case {key} (listed in {SIZES_FILE}): preprocessed shape {tuple(data.shape[1:])} "
                                     f"does not fit one {patch} patch; size supervision needs each whole 2D image in "
                                     f"one patch")
            size_cases[key] = (image, sizes_mm[key] / pixel_mm)
            if bool(np.all(np.asarray(seg) == self.ignore_value)):
                size_only.add(key)
        pixel_keys = [k for k in tr_keys if k not in size_only]
        if not pixel_keys:
            raise SizeLabelError(f"fold {self.fold}: no pixel-labelled training case; phase 1 needs some")
        dropped = [k for k in val_keys if k in sizes_mm]
        if dropped:
            kept = set(self._pixel_labelled(dropped))
            val_keys = [k for k in val_keys if k not in sizes_mm or k in kept]
        self.size_cases = size_cases
        self.print_to_log_file(
            f"size supervision: {len(pixel_keys)} pixel-labelled and {len(size_only)} size-only training cases; the "
            f"size loss uses the {len(size_cases)} with a size (sizes from {self.sizes_file()}, {pixel_mm:g} mm per "
            f"pixel); phase 1 (pixel loss only) "
            f"{self.pretrain_epochs} epochs, then the size loss (weight {self.size_params.size_weight:g}, pixel "
            f"weight {self.size_params.pixel_weight:g}, {self.size_params.samples} sample(s))")
        return pixel_keys, val_keys

    def _pixel_labelled(self, keys: list[str]) -> list[str]:
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        return [k for k in keys if not np.all(np.asarray(dataset.load_case(k)[1]) == self.ignore_value)]

    def on_train_start(self):
        self._continue_pretrained_model()
        log = self.size_log()
        if self.local_rank == 0 and any(r.get("epoch", 0) >= self.current_epoch for r in log):
            # epochs of an interrupted or replaced run after the checkpoint this one starts from
            write_json_atomic([r for r in log if r.get("epoch", 0) < self.current_epoch],
                              join(self.output_folder, LOG_FILE), indent=1)
        super().on_train_start()
        if self.label_manager.num_segmentation_heads not in (1, 2):
            raise SizeLabelError("size supervision needs one foreground class (a binary network)")
        if self.size_cases and self.size_params.size_weight > 0:
            self.size_batches = SizeBatches(self.size_cases, self.configuration_manager.patch_size,
                                            self.size_params.size_batch_size or self.batch_size,
                                            self.size_params.mirror, seed=self.current_epoch + 1000 * self.local_rank)
        if self.local_rank == 0:
            shutil.copy(self.sizes_file(), join(self.output_folder, SIZES_FILE))

    def _continue_pretrained_model(self) -> None:
        """A fresh start with ``-pretrained_weights FILE`` (phase 2 from phase 1's checkpoint)
        continues that model whole: nnU-Net loaded everything but the segmentation layers, which
        it leaves random for another label set; the labels are the same here, so they are loaded
        too (when their shapes match). Without it phase 2 began with a random output layer."""
        from nnunet_stseg.adapters.nnunet_hooks import load_segmentation_layers, pretrained_weights_argument

        source = pretrained_weights_argument()
        if self.current_epoch > 0 or source is None or not os.path.isfile(source):
            return
        loaded = load_segmentation_layers(self.network, source)
        self.print_to_log_file(f"segmentation layers also taken from {source} ({len(loaded)} tensors)" if loaded else
                               f"segmentation layers of {source} do not match this network: left as nnU-Net made them")

    # ------------------------------------------------------------------ training
    def foreground_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, H, W) probability of the object from the network's full-resolution output."""
        if self.label_manager.has_regions or logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0].float())
        return torch.softmax(logits.float(), 1)[:, 1]

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_record = {"epoch": self.current_epoch, "phase": 2 if self.in_size_phase() else 1,
                              "start": time.time(), "size_loss": [], "size_error_px2": []}

    def train_step(self, batch: dict) -> dict:
        if not self.in_size_phase():
            return super().train_step(batch)
        data, target = batch["data"], batch["target"]
        images, valid, sizes = next(self.size_batches)
        n_pixel = data.shape[0]
        data = torch.cat([data, images], 0).to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        valid, sizes = valid.to(self.device), sizes.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            outputs = output if isinstance(output, (list, tuple)) else [output]
            pixel_out = [o[:n_pixel] for o in outputs] if isinstance(output, (list, tuple)) else output[:n_pixel]
            pixel_loss = self.loss(pixel_out, target)
        probability = self.foreground_probability(outputs[0][n_pixel:]) * valid
        gradient, sampled = size_loss_gradient(probability.detach(), sizes, self.size_params.samples)
        size_loss = (gradient * probability).flatten(1).sum(1).mean()
        total = self.size_params.pixel_weight * pixel_loss + self.size_params.size_weight * size_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        with torch.no_grad():
            predicted = object_size(probability.detach() > 0.5).float()
            self._epoch_record["size_error_px2"].append(float(((predicted - sizes) ** 2).mean()))
            self._epoch_record["size_loss"].append(float(sampled.mean()))
        return {"loss": pixel_loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        record = self._epoch_record
        record["seconds"] = time.time() - record.pop("start", time.time())
        for k in ("size_loss", "size_error_px2"):
            record[k] = float(np.mean(record[k])) if record[k] else None
        if record["phase"] == 2:
            self.print_to_log_file(f"size phase: sampled relative size loss {record['size_loss']:.4f}, squared size "
                                   f"error of the argmax {record['size_error_px2']:.1f} px^2")

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step, plus the squared size error E of the argmax prediction against
        the label's size on each validation image (pixels^2; the paper's validation E)."""
        out = super().validation_step(batch)
        data, target = batch["data"].to(self.device), batch["target"]
        target = (target[0] if isinstance(target, list) else target)[:, 0].to(self.device)
        output = self.network(data)
        predicted = self.foreground_probability(output[0] if isinstance(output, (list, tuple)) else output) > 0.5
        errors = squared_size_error(predicted, object_size(target == self.foreground_value))
        self._val_size_errors.extend(float(e) for e in errors)
        return out

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_size_errors = []

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        record = self._epoch_record
        record["val_size_error_px2"] = float(np.mean(self._val_size_errors)) if self._val_size_errors else None
        if record["val_size_error_px2"] is not None:
            self.print_to_log_file(f"validation size error E {record['val_size_error_px2']:.2f} px^2")
        if self.local_rank == 0:
            log = [r for r in self.size_log() if r.get("epoch") != record["epoch"]] + [record]
            write_json_atomic(log, join(self.output_folder, LOG_FILE), indent=1)

    def size_log(self) -> list[dict]:
        """The per-epoch records of ``size_training.json`` (empty before the first epoch)."""
        path = join(self.output_folder, LOG_FILE)
        return json.loads(Path(path).read_text()) if os.path.isfile(path) else []

    def monitored_values(self, last_epoch: int) -> tuple[str, list[float]]:
        """The plateau rule (``STSEG_PATIENCE``) in the size phase watches the validation size error
        E (the paper's phase-2 rule); a training without a size phase watches the validation loss;
        phase 1 of a training with a size phase to come runs its ``pretrain_epochs`` (nothing
        watched)."""
        if self.size_params.size_weight <= 0 or not self.size_cases:
            return super().monitored_values(last_epoch)
        if last_epoch < self.pretrain_epochs:
            return "validation loss", []
        records = sorted((r for r in self.size_log() if r.get("phase") == 2 and r["epoch"] <= last_epoch),
                         key=lambda r: r["epoch"])
        return "validation size error E (px^2)", [
            math.nan if r.get("val_size_error_px2") is None else float(r["val_size_error_px2"]) for r in records]

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0 and os.path.isfile(join(self.output_folder, "validation", "summary.json")):
            add_precision_recall(join(self.output_folder, "validation", "summary.json"))


__all__ = ["nnUNetTrainer_StSSizes", "SizeBatches"]
