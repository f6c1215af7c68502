"""L-SNet built from nnU-Net plans and predicted by the stock ``nnUNetv2_predict`` (methods.md section 5).

- L-Net: the coarse configuration's planned encoder-decoder (``dynamic_network_architectures``'
  U-Net, built by nnU-Net) read at the decoder stage whose stride is nearest to
  ``sts.lsnet.feature_stride`` (:class:`UNetFeatures`), with
  :class:`~nnunet_stseg.core.lsnet.LocalisationHeads` on it. The U-Net keeps all its layers (its
  unused last decoder stages and segmentation layers included) so that the coarse model's state
  dict loads into it unchanged.
- S-Net: the L-SNet configuration's own architecture (a copy of the fine one: the cascade's fine
  model loads into it unchanged).

:class:`LSNetPredictor` is the end-to-end model's predictor (slices in batches, all RoIs fused,
TTA, folds) with L-SNet's plan parameters.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_stseg.adapters.config import LSNetParams, StSConfig
from nnunet_stseg.adapters.crop_guided_predictor import CropGuidedPredictor
from nnunet_stseg.core.lsnet import LocalisationNetwork, LSNet


def decoder_strides(unet: nn.Module) -> list[int]:
    """The in-plane stride of each decoder stage's output of an nnU-Net U-Net (stage 0 is the
    coarsest), from its encoder's strides."""
    per_stage = [int(np.prod(s[-1:])) for s in unet.encoder.strides]  # the last axis: square in-plane pooling
    cumulative = np.cumprod(per_stage)
    return [int(cumulative[-(s + 2)]) for s in range(len(unet.decoder.stages))]


class UNetFeatures(nn.Module):
    """The feature map of an nnU-Net U-Net at one decoder stage: encoder, then the decoder's
    transposed convolutions and stages up to ``stage`` (0 = the coarsest). ``stride`` and
    ``channels`` describe that map."""

    def __init__(self, unet: nn.Module, wanted_stride: int):
        super().__init__()
        self.unet = unet
        strides = decoder_strides(unet)
        self.stage = int(np.argmin([abs(np.log2(s) - np.log2(wanted_stride)) for s in strides]))
        self.stride = strides[self.stage]
        self.channels = int(unet.encoder.output_channels[-(self.stage + 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.unet.encoder(x)
        decoder = self.unet.decoder
        x = skips[-1]
        for s in range(self.stage + 1):
            x = decoder.stages[s](torch.cat((decoder.transpconvs[s](x), skips[-(s + 2)]), 1))
        return x


def build_lsnet(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int) -> LSNet:
    """L-Net on the coarse configuration's architecture, S-Net on this configuration's, both
    without deep supervision, with the configuration's ``sts.lsnet`` parameters (the output kind is
    set by :func:`configure_lsnet`)."""
    sts = StSConfig.from_configuration(configuration_manager.configuration, "the L-SNet configuration")
    params = LSNetParams.from_configuration(configuration_manager.configuration, "the L-SNet configuration")
    coarse_cm = plans_manager.get_configuration(sts.coarse_configuration)
    unet = nnUNetTrainer.build_network_architecture(plans_manager, coarse_cm, num_input_channels,
                                                    num_output_channels, False)
    features = UNetFeatures(unet, params.feature_stride)
    locator = LocalisationNetwork(features, features.channels, features.stride)
    segmenter = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                         num_output_channels, False)
    # the S-Net patch is the fine configuration's S x S (a trainer may show nnU-Net another patch: its canvas)
    return LSNet(locator, segmenter, coarse_cm.patch_size, [sts.input_size] * 2, num_output_channels,
                 margin_fraction=params.margin_fraction, threshold=params.threshold, gamma=params.gamma,
                 top_k=params.top_k, fallback=params.fallback)


def configure_lsnet(net: LSNet, configuration: dict, multilabel: bool, where: str) -> tuple[StSConfig, LSNetParams]:
    """Check that ``configuration`` is an L-SNet one and give its network the output kind (the label
    manager's, which the builder does not see); returns the ``sts`` block (with its ``lsnet`` parameters)."""
    sts = StSConfig.for_role(configuration, "lsnet", where, "L-SNet")
    net.multilabel = bool(multilabel)
    return sts, sts.lsnet or LSNetParams()


class LSNetPredictor(CropGuidedPredictor):
    """nnU-Net predictor for L-SNet: per slice, L-Net keypoints -> RoIs -> S-Net -> inverse map
    and fusion (see :class:`~nnunet_stseg.adapters.crop_guided_predictor.CropGuidedPredictor`)."""

    model_name = "L-SNet"
    lsnet: LSNetParams | None = None

    run_keys = ("crops_per_batch", "objects_report")

    def configure(self, net: LSNet) -> StSConfig:
        sts, self.lsnet = configure_lsnet(net, self.configuration_manager.configuration,
                                          self.label_manager.has_regions, "the L-SNet model's configuration")
        return sts


__all__ = ["LSNetPredictor", "UNetFeatures", "build_lsnet", "configure_lsnet", "decoder_strides"]
