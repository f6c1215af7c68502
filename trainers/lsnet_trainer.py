"""L-SNet as nnU-Net trainers (methods.md section 5; seed 001).

``nnunet-stseg plan -d D -s S --lsnet`` adds ``2d_sts_lsnet_<S>``: a copy of the 2d fine
configuration (full-resolution data; S-Net = the fine architecture and patch; L-Net = the coarse
configuration's architecture and input size) with role ``lsnet`` and an ``sts.lsnet`` block
(:class:`~nnunet_stseg.adapters.config.LSNetParams`). Two trainings per fold, one checkpoint each:

    nnUNetv2_train D 2d_sts_lsnet_<S> F -tr nnUNetTrainer_StSLNet    # L-Net; S-Net = the fine model, frozen
    nnUNetv2_train D 2d_sts_lsnet_<S> F -tr nnUNetTrainer_StSLSNet   # joint training from that model
    nnUNetv2_predict -i IN -o OUT -d D -c 2d_sts_lsnet_<S> -tr <either> -f F

``nnUNetTrainer_StSLNet`` trains L-Net alone (its encoder-decoder from the coarse model of the fold
when ``locator_from_coarse``); its S-Net is the cascade's fine model of the fold, copied in and never
updated: the model it saves IS the cascade with L-Net as its first stage. ``nnUNetTrainer_StSLSNet``
starts from that model and trains as the paper does: per iteration, one step on L-Net's loss, then
one RoI per image at one of its top-3 peaks, recalibrated from the full-resolution image, and one
step on the S-Net loss, whose gradient into L-Net is scaled by ``gamma``.

Samples are whole images (a random slice of a volume) resampled to the training canvas and
augmented by nnU-Net's transforms (:class:`~nnunet_stseg.trainers.crop_guided_trainer.WholeImageLoader`);
L-Net sees them downscaled to its input size, its targets come from the label max-pooled to the same
grid (an object smaller than a cell keeps a pixel). The final validation runs the whole model on
the fold's full-resolution validation cases, scored like the cascade's.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from nnunet_stseg.adapters.config import DEFAULT_FINE_TRAINER, LNET_TRAINER, LSNetParams, fine_config_name
from nnunet_stseg.adapters.lsnet_model import LSNetPredictor, build_lsnet, configure_lsnet
from nnunet_stseg.adapters.nnunet_hooks import adopt_predictor_from_caller
from nnunet_stseg.core.crop_guided import CropGuidedOutput, crop_targets
from nnunet_stseg.core.lsnet import LocalisationLoss, LocalisationOutput, parameter_count
from nnunet_stseg.trainers.centre_trainer import target_foreground
from nnunet_stseg.trainers.crop_guided_trainer import WholeImageModelTrainer


class LSNetLoss(torch.nn.Module):
    """L-SNet's two losses on a batch of whole images and their nnU-Net targets (B, L, H, W):
    :meth:`locator` (L-Net's, on the foreground max-pooled to L-Net's input grid) and
    :meth:`segmenter` (``segmentation_weight`` x nnU-Net's loss on the S-Net output against the
    label cut at the same RoIs); calling the module gives their sum (the validation loss)."""

    def __init__(self, segmentation_loss, params: LSNetParams, has_regions: bool, ignore_label, locator_size,
                 stride: int):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.localisation_loss = LocalisationLoss(params.sigma, params.dice_weight, params.box_loss_weight)
        self.segmentation_weight = params.segmentation_loss_weight
        self.has_regions, self.ignore_label = has_regions, ignore_label
        self.locator_size, self.stride = tuple(locator_size), int(stride)

    def locator(self, output: LocalisationOutput, target: torch.Tensor) -> torch.Tensor:
        fg = target_foreground(target, self.has_regions, self.ignore_label).float()[:, None]
        fg = F.adaptive_max_pool2d(fg, self.locator_size) > 0
        return self.localisation_loss(output, fg, self.stride)

    def segmenter(self, output: CropGuidedOutput, target: torch.Tensor) -> torch.Tensor:
        if output.fine.shape[0] == 0:
            return output.fine.sum()
        return self.segmentation_weight * self.segmentation_loss(
            output.fine, crop_targets(target, output.boxes, tuple(output.fine.shape[2:])))

    def forward(self, output: CropGuidedOutput, target: torch.Tensor) -> torch.Tensor:
        return self.locator(output.localisation, target) + self.segmenter(output, target)


class nnUNetTrainer_StSLNet(WholeImageModelTrainer):
    """Trains L-Net with the cascade's fine model as a frozen S-Net (see the module docstring)."""

    role = "lsnet"
    model_name = "L-SNet"
    validation_title = "L-SNet"
    params_class = LSNetParams
    predictor_class = LSNetPredictor
    trains_segmenter = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        """L-Net on the coarse configuration's architecture, S-Net on this one's (no deep supervision)."""
        adopt_predictor_from_caller(LSNetPredictor)
        return build_lsnet(plans_manager, configuration_manager, num_input_channels, num_output_channels)

    def initialize(self):
        super().initialize()
        net = self._plain_network()
        configure_lsnet(net, self.configuration_manager.configuration, self.label_manager.has_regions,
                        f"configuration '{self.configuration_name}'")
        features = net.locator.features
        self.print_to_log_file(
            f"L-SNet: L-Net on the coarse architecture at {list(net.locator_size)}, heads on decoder stage "
            f"{features.stage} (stride {features.stride}, {features.channels} channels; asked for stride "
            f"{self.params.feature_stride}), heads {parameter_count(net.locator.heads)} parameters; S-Net patch "
            f"{list(net.roi_size)}; gamma {net.gamma:g}, margin {net.margin:.2f} px of L-Net's input, sigma "
            f"{self.params.sigma:g} cells; training canvas {self.canvas}; trains "
            f"{'L-Net and S-Net' if self.trains_segmenter else 'L-Net only (S-Net frozen)'}")

    def _build_loss(self):
        net = self._plain_network()
        return LSNetLoss(super()._build_loss(), self.params, self.label_manager.has_regions,
                         self.label_manager.ignore_label, net.locator_size, net.locator.stride)

    def _step(self, loss: torch.Tensor) -> None:
        """backward and one optimiser step with nnU-Net's gradient clipping (and scaler on CUDA)."""
        params = list(self.network.parameters())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def train_step(self, batch: dict) -> dict:
        """The paper's alternation: a step on L-Net's loss, then (L-SNet only) a step on the S-Net
        loss through RoIs at the updated L-Net's peaks (gradient into L-Net scaled by gamma)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (target[0] if isinstance(target, list) else target).to(self.device, non_blocking=True)
        net = self._plain_network()
        autocast = torch.autocast(self.device.type) if self.device.type == "cuda" else contextlib.nullcontext()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            locator_loss = self.loss.locator(net.locate(data), target)
        self._step(locator_loss)
        total = locator_loss.detach()
        if self.trains_segmenter:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast:
                segmenter_loss = self.loss.segmenter(self.network(data), target)
            self._step(segmenter_loss)
            total = total + segmenter_loss.detach()
        return {"loss": total.cpu().numpy()}

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0:  # a fresh start (``--c`` with a checkpoint resumes its weights)
            self.init_modules()

    def _load(self, path: str) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]

    def init_modules(self) -> None:
        """L-Net's encoder-decoder from the coarse model (``locator_from_coarse``), S-Net from the
        cascade's fine model of this fold (the cascade with L-Net as first stage)."""
        net = self._plain_network()
        coarse = self.fold_checkpoint(self.sts.coarse_trainer, self.sts.coarse_configuration)
        if not self.params.locator_from_coarse:
            self.print_to_log_file("sts.lsnet.locator_from_coarse is false: L-Net starts from scratch",
                                   also_print_to_console=True)
        elif os.path.isfile(coarse):
            net.locator.features.unet.load_state_dict(self._load(coarse))
            self.print_to_log_file(f"L-Net's encoder-decoder initialised from the coarse model {coarse}",
                                   also_print_to_console=True)
        else:
            self.print_to_log_file(f"no coarse model at {coarse}: L-Net starts from scratch",
                                   also_print_to_console=True)
        fine_configuration = fine_config_name("2d", self.sts.input_size)
        fine = self.fold_checkpoint(DEFAULT_FINE_TRAINER, fine_configuration)
        if os.path.isfile(fine):
            net.segmenter.load_state_dict(self._load(fine))
            self.print_to_log_file(f"S-Net is the cascade's fine model {fine}", also_print_to_console=True)
        else:
            self.print_to_log_file(
                f"WARNING: no fine model at {fine}: S-Net stays untrained, so this model segments nothing useful "
                f"until nnUNetTrainer_StSLSNet trains it (or train the fine model first: nnUNetv2_train "
                f"{self.plans_manager.dataset_name} {fine_configuration} {self.fold} -tr {DEFAULT_FINE_TRAINER})",
                also_print_to_console=True)


class nnUNetTrainer_StSLSNet(nnUNetTrainer_StSLNet):
    """Trains L-SNet jointly (see the module docstring), from the ``nnUNetTrainer_StSLNet`` model of
    the fold (of ``sts.lsnet.start_configuration``, default this configuration)."""

    trains_segmenter = True

    def init_modules(self) -> None:
        start = self.params.start_configuration or self.configuration_name
        path = self.fold_checkpoint(LNET_TRAINER, start)
        if os.path.isfile(path):
            self._plain_network().load_state_dict(self._load(path))
            self.print_to_log_file(f"L-SNet initialised from the L-Net model {path}", also_print_to_console=True)
            return
        self.print_to_log_file(
            f"WARNING: no L-Net model at {path} (train it first: nnUNetv2_train {self.plans_manager.dataset_name} "
            f"{start} {self.fold} -tr {LNET_TRAINER}); starting from the coarse and fine models instead",
            also_print_to_console=True)
        super().init_modules()


__all__ = ["LSNetLoss", "nnUNetTrainer_StSLNet", "nnUNetTrainer_StSLSNet"]
