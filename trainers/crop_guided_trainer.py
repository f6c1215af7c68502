"""The end-to-end crop-guided network as an nnU-Net trainer (methods.md section 2; seed 003, 5.2).

``nnunet-stseg plan -d D -s S --e2e`` adds ``2d_sts_e2e_<S>``: a copy of the 2d fine configuration
(full-resolution data, crop parameters, the coarse configuration it belongs to) with role ``e2e``
and an ``sts.e2e`` block (:class:`~nnunet_stseg.adapters.config.E2EParams`). Then:

    nnUNetv2_train D 2d_sts_e2e_<S> F -tr nnUNetTrainer_StSEndToEnd
    nnUNetv2_predict -i IN -o OUT -d D -c 2d_sts_e2e_<S> -tr nnUNetTrainer_StSEndToEnd -f F

One network, :class:`~nnunet_stseg.core.crop_guided.CropGuidedNetwork`: both modules take the coarse
configuration's architecture (the fine module with one more input channel), so that both start
from the coarse model of the same fold, trained with ``nnUNetTrainer_StSCoarse`` (the thesis's
pre-training on downscaled images); without it, training starts from scratch and the log says so.

Training samples are whole images (a random slice of a volume) resampled to ``sts.e2e.canvas``
(default: the configuration's median image size) and augmented by nnU-Net's own transforms at that
size; the model runs on the batch as at inference, except that each image contributes one of its
boxes; the loss is :class:`~nnunet_stseg.core.crop_guided.CropGuidedLoss` around nnU-Net's loss
(deep supervision off: the crop sits between the modules). nnU-Net's ``train_step`` is used as it is
(autocast, gradient clipping, DDP through the network's forward). The final validation runs the
whole model on the fold's full-resolution validation cases, like the cascade's.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_stseg.adapters.config import E2EParams, StSConfig, grid_spacing3
from nnunet_stseg.adapters.crop_guided_predictor import CropGuidedPredictor, configure_network
from nnunet_stseg.adapters.nnunet_hooks import adopt_predictor_from_caller
from nnunet_stseg.adapters.passes import unwrapped
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.core.crop_guided import CropGuidedLoss, CropGuidedNetwork, crop_targets
from nnunet_stseg.core.depth import DEPTH_KEY
from nnunet_stseg.core.geometry import crop_and_resample
from nnunet_stseg.trainers.loaders import ResampledSampleLoader, build_dataloaders
from nnunet_stseg.trainers.sts_trainers import _StSScheduleMixin
from nnunet_stseg.trainers.validation import validate_whole_model, validation_predictor


class WholeImageLoader(ResampledSampleLoader):
    """One whole image per batch element (a random slice of a volume), resampled to the canvas
    (``final_patch_size``); the loader's ``patch_size`` may be larger (nnU-Net's rotation margin):
    the image is then placed in the middle with zero padding around it, so that nnU-Net's spatial
    augmentation, which keeps the central ``final_patch_size``, ends on exactly the image."""

    def make_sample(self, key, data, seg, properties, rng):
        shape = np.asarray(data.shape[1:], dtype=float)  # (Z, Y, X)
        z = int(rng.integers(int(shape[0])))
        enlarge = np.asarray(self.patch_size, dtype=float) / np.asarray(self.final_patch_size, dtype=float)
        centre, half = shape[1:] / 2, shape[1:] * enlarge[1:] / 2
        box = np.array([[[0, 1], *np.stack([centre - half, centre + half], axis=1).tolist()]])
        img = torch.from_numpy(np.asarray(data[:, z:z + 1]).astype(np.float32))
        lab = torch.from_numpy(np.asarray(seg[:, z:z + 1]).astype(np.float32))
        img = crop_and_resample(img, box, self.patch_size, "linear", padding_mode="zeros")[0]
        lab = crop_and_resample(lab, box, self.patch_size, "nearest", padding_mode="zeros")[0]
        return img, lab.round().to(torch.int16), z


class WholeImageModelTrainer(_StSScheduleMixin, nnUNetTrainer):
    """What every one-checkpoint crop-guided model's trainer shares (the end-to-end network,
    L-SNet): the configuration's role and 2D checks, its parameter block (``params_class``) as
    ``self.params``, deep supervision off, whole images resampled to the training canvas
    (:class:`WholeImageLoader`), nnU-Net's pseudo-Dice on the model's crops, and the final validation
    of the whole model at full resolution by ``predictor_class``."""

    role = "e2e"
    model_name = "end-to-end model"
    validation_title = "End-to-end"  # the log's "<title> validation complete"
    params_class: type = E2EParams
    predictor_class: type = CropGuidedPredictor

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        where = f"configuration '{configuration}'"
        cfg = self.configuration_manager.configuration
        self.sts = StSConfig.for_role(cfg, self.role, where, self.__class__.__name__)
        if len(self.configuration_manager.patch_size) != 2:
            raise ValueError(f"the {self.model_name} is 2D (slice by slice on 3D volumes); '{configuration}' is 3D")
        if cfg.get(DEPTH_KEY, False):
            raise ValueError(f"the {self.model_name} has no depth channel, but '{configuration}' asks for one")
        self.params = self.params_class.from_configuration(cfg, where)
        self.enable_deep_supervision = False  # the crop sits between the modules: one output per module
        self._apply_schedule_overrides()
        # nnU-Net's transforms (and their rotation margin) work on the patch of the configuration
        # manager: here the canvas whole images are resampled to. The plans stay untouched.
        self.canvas = [int(c) for c in (self.params.canvas or np.rint(cfg["median_image_size_in_voxels"][-2:]))]
        self.configuration_manager = ConfigurationManager({**cfg, "patch_size": self.canvas})

    def _plain_network(self):
        return unwrapped(self.network.module if self.is_ddp else self.network)

    def set_deep_supervision_enabled(self, enabled: bool):
        """Nothing to switch: the modules are built without deep supervision."""

    def get_dataloaders(self):
        return build_dataloaders(self, lambda dataset, patch, final_patch, transforms, train: WholeImageLoader(
            dataset, self.batch_size, patch, final_patch, self.label_manager, transforms=transforms))

    def fold_checkpoint(self, trainer: str, configuration: str) -> str:
        """``checkpoint_final.pth`` of this fold's model of ``trainer`` on ``configuration`` (same
        dataset and plans)."""
        folder = model_folder(self.plans_manager.dataset_name, trainer, configuration, self.plans_manager.plans_name)
        return os.path.join(str(folder), f"fold_{self.fold}", "checkpoint_final.pth")

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's per-batch pseudo-Dice, on the fine module's crops (what the model outputs)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with torch.no_grad(), (torch.autocast(self.device.type) if self.device.type == "cuda"
                               else torch.autocast("cpu", enabled=False)):
            output = self.network(data)
            loss = self.loss(output, target)
        fine = output.fine
        target = crop_targets(target, output.boxes, tuple(fine.shape[2:]))
        lm = self.label_manager
        if lm.has_regions:
            predicted = (torch.sigmoid(fine) > 0.5).long()
        else:
            predicted = torch.zeros_like(fine).scatter_(1, fine.argmax(1, keepdim=True), 1)
        mask = None
        if lm.has_ignore_label:
            if lm.has_regions:
                mask, target = 1 - target[:, -1:], target[:, :-1]
            else:
                mask = (target != lm.ignore_label).float()
                target = torch.where(target == lm.ignore_label, 0, target)
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=[0] + list(range(2, fine.ndim)), mask=mask)
        if not lm.has_regions:  # nnU-Net reports foreground classes only
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.detach().cpu().numpy(),
                "fp_hard": fp.detach().cpu().numpy(), "fn_hard": fn.detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities: bool = False):
        """The whole model on the fold's full-resolution validation cases, scored like the cascade's."""
        predictor = validation_predictor(self, self.predictor_class)
        validate_whole_model(self, predictor, self.validation_title, save_probabilities,
                             case_log=lambda k: predictor.last_timings)


class nnUNetTrainer_StSEndToEnd(WholeImageModelTrainer):
    """Trains the end-to-end crop-guided network (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.e2e = self.params
        self.print_to_log_file(f"end-to-end model: box rule '{self.e2e.box_rule}', loss {self.e2e.fine_loss_weight:g} "
                               f"x fine + {self.e2e.coarse_loss_weight:g} x coarse, training canvas {self.canvas}")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        """Both modules with the coarse configuration's architecture (the fine one with one more input
        channel: the coarse probability), without deep supervision."""
        adopt_predictor_from_caller(CropGuidedPredictor)
        sts = StSConfig.from_configuration(configuration_manager.configuration, "the end-to-end configuration")
        coarse_cm = plans_manager.get_configuration(sts.coarse_configuration)
        coarse = nnUNetTrainer.build_network_architecture(plans_manager, coarse_cm, num_input_channels,
                                                          num_output_channels, False)
        fine = nnUNetTrainer.build_network_architecture(plans_manager, coarse_cm, num_input_channels + 1,
                                                        num_output_channels, False)
        e2e = E2EParams.from_configuration(configuration_manager.configuration, "the end-to-end configuration")
        return CropGuidedNetwork(coarse, fine, coarse_cm.patch_size, grid_spacing3(configuration_manager.spacing)[1:],
                                 sts.crop, e2e.box_rule)

    def initialize(self):
        super().initialize()
        configure_network(self._plain_network(), self.configuration_manager.configuration,
                          self.label_manager.has_regions, f"configuration '{self.configuration_name}'")

    def _build_loss(self):
        return CropGuidedLoss(super()._build_loss(), self.e2e.coarse_loss_weight, self.e2e.fine_loss_weight)

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:  # a fresh start (``--c`` with a checkpoint resumes its weights)
            self.init_from_coarse_model()

    def init_from_coarse_model(self) -> None:
        """The thesis's initialisation: both modules from the coarse model of this fold (the network
        pre-trained on downscaled images), the fine module's extra channel at zero weight."""
        path = self.fold_checkpoint(self.sts.coarse_trainer, self.sts.coarse_configuration)
        if not self.e2e.pretrained:
            self.print_to_log_file("sts.e2e.pretrained is false: both modules start from scratch",
                                   also_print_to_console=True)
            return
        if not os.path.isfile(path):
            self.print_to_log_file(
                f"WARNING: no pre-trained coarse model at {path}: both modules start from scratch (the thesis "
                f"pre-trains them; train it first with nnUNetv2_train {self.plans_manager.dataset_name} "
                f"{self.sts.coarse_configuration} {self.fold} -tr {self.sts.coarse_trainer})",
                also_print_to_console=True)
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self._plain_network().init_from_pretrained(checkpoint["network_weights"])
        self.print_to_log_file(f"both modules initialised from the coarse model {path} (fine module: zero weight on "
                               f"the coarse-probability channel)", also_print_to_console=True)


__all__ = ["nnUNetTrainer_StSEndToEnd", "WholeImageLoader", "WholeImageModelTrainer"]
