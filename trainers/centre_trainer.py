"""Centre-point heatmap network (origin source B of the polar stage): ``nnUNetTrainer_StSCentre``.

Trained with the stock ``nnUNetv2_train D 2d_sts_coarse_<S> F -tr nnUNetTrainer_StSCentre`` on the
same coarse configuration as the coarse model (whole image, downsampled): nnU-Net's U-Net with ONE
output channel. With ``sts.centre.loss`` ``focal`` (default) the channel holds logits trained with
CenterNet's penalty-reduced focal loss (:class:`HeatmapFocalLoss`; output bias started at
CenterNet's prior, sigmoid 0.1), so the heatmap is the sigmoid of the output; with ``mse`` (plans
made before 0.7) it regresses the heatmap itself, squared error relative to the heatmap's energy
(:class:`HeatmapMSELoss`). The target is made from nnU-Net's augmented training
target of each batch (:func:`nnunet_stseg.core.centres.heatmap_targets`), so every spatial augmentation
moves the Gaussians with the objects; sigma comes from ``sts.centre`` in the plans (chosen from the
dataset's object sizes by ``nnunet-stseg plan --polar``). No deep supervision.

nnU-Net's online "pseudo Dice" of this trainer is the centre-detection F1 on the validation batches
(a peak inside an object detects it; see :func:`nnunet_stseg.core.centres.match_peaks_to_objects`); its
final validation writes ``validation/summary_centres.json`` (precision, recall, F1, distance of
the detected peaks to the object centroids in pixels and mm, and a calibration table: how often
a peak of each height band is a true centre) instead of segmentations.
"""
from __future__ import annotations

from os.path import join

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_stseg.adapters.config import CentreParams, StSConfig
from nnunet_stseg.adapters.nnunet_hooks import loading_predictor
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.centres import (calibration_table, centre_probability, heatmap_peaks, heatmap_targets,
                                       match_peaks_to_objects, peak_hits)
from nnunet_stseg.core.geometry import label_foreground
from nnunet_stseg.core.lsnet import KEYPOINT_PRIOR_BIAS, focal_loss
from nnunet_stseg.trainers.sts_trainers import nnUNetTrainer_StSCoarse
from nnunet_stseg.trainers.validation import gather_on_rank0, validation_cases, validation_predictor


def target_foreground(target: torch.Tensor, has_regions: bool, ignore_label) -> torch.Tensor:
    """Foreground (B, H, W) bool of nnU-Net's training target (labels (B, 1, H, W), or region maps
    (B, R, H, W) with the ignore mask as last channel when there is an ignore label)."""
    if has_regions:
        maps = target[:, :-1] if ignore_label is not None else target
        return (maps > 0).any(dim=1)
    return label_foreground(target[:, 0], ignore_label)


class HeatmapMSELoss(torch.nn.Module):
    """Squared error between the network's single output channel and the heatmap of the target's
    objects, relative to the heatmap's energy: ``sum((out - t)^2) / (sum(t^2) + floor * pixels)``.

    Why not the plain mean (the paper's MSE): a heatmap is sparse, so its mean squared value is
    ~0.01 and so is the loss of predicting zeros everywhere; with nnU-Net's SGD schedule the
    network then barely moves (Cardiac Fat at 128 px, sigma 6.6 px: no peak >= 0.5 after 1000
    iterations, loss 0.0084 -> 0.0063). Dividing by the target's energy keeps the same minimiser
    and makes the loss O(1) whatever the size and number of objects; ``floor`` keeps batches
    without objects (target 0) on the same scale."""

    def __init__(self, sigma: float, has_regions: bool, ignore_label, floor: float = 0.01):
        super().__init__()
        self.sigma, self.has_regions, self.ignore_label, self.floor = sigma, has_regions, ignore_label, floor

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fg = target_foreground(target, self.has_regions, self.ignore_label)
        heat = heatmap_targets(fg, self.sigma)
        return ((output.float() - heat) ** 2).sum() / (heat.pow(2).sum() + self.floor * heat.numel())


class HeatmapFocalLoss(torch.nn.Module):
    """CenterNet's penalty-reduced focal loss (:func:`nnunet_stseg.core.lsnet.focal_loss`, the
    L-Net keypoint loss) of the output logits against Gaussians centred on the pixel holding each
    object's centre (peak exactly 1 there), normalised by the number of objects."""

    def __init__(self, sigma: float, has_regions: bool, ignore_label):
        super().__init__()
        self.sigma, self.has_regions, self.ignore_label = sigma, has_regions, ignore_label

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fg = target_foreground(target, self.has_regions, self.ignore_label)
        return focal_loss(output, heatmap_targets(fg, self.sigma, on_pixel=True))


CALIBRATION_FLOOR = 0.1  # peaks from this height enter the calibration table of the validation


class nnUNetTrainer_StSCentre(nnUNetTrainer_StSCoarse):
    """Heatmap of object centres on the coarse configuration (see the module docstring)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        sts = StSConfig.for_role(self.configuration_manager.configuration, "coarse", f"configuration '{configuration}'",
                                 self.__class__.__name__)
        if sts.centre is None:
            raise ValueError(f"{self.__class__.__name__} trains on a 2d coarse configuration planned with "
                             f"`nnunet-stseg plan --polar` (it needs sts.centre); '{configuration}' has none")
        self.centre: CentreParams = sts.centre
        self.enable_deep_supervision = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        predictor = loading_predictor()
        if predictor is not None and not getattr(predictor, "stseg_centre_model", False):
            sts = configuration_manager.configuration.get("sts", {})
            raise ValueError(
                f"{cls.__name__} predicts object centres (a heatmap), not segmentations; nnUNetv2_predict cannot "
                f"export it. Use it through the polar stage: STSEG_OVERRIDES=polar.origin_source=heatmap "
                f"nnUNetv2_predict ... -c 2d_sts_polar_{sts.get('input_size', 'S')} -tr nnUNetTrainer_StSPolar")
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels, 1,
                                                     enable_deep_supervision)
        centre = configuration_manager.configuration.get("sts", {}).get("centre")
        if centre is not None and CentreParams.from_dict(centre).loss == "focal":
            # CenterNet's start: every pixel a centre with probability 0.1, not 0.5 (the focal loss of
            # 0.5 on every background pixel would swamp the few centres in the first steps)
            for layer in network.decoder.seg_layers:  # nnU-Net's U-Nets: the 1x1 output convolutions
                torch.nn.init.constant_(layer.bias, KEYPOINT_PRIOR_BIAS)
        return network

    def _build_loss(self):
        lm = self.label_manager
        if self.centre.loss == "focal":
            return HeatmapFocalLoss(self.centre.sigma, lm.has_regions, lm.ignore_label)
        return HeatmapMSELoss(self.centre.sigma, lm.has_regions, lm.ignore_label)

    def _detections(self, output: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
        fg = target_foreground(target, self.label_manager.has_regions, self.label_manager.ignore_label).cpu().numpy()
        tp = fp = fn = 0
        heats = centre_probability(output[:, 0].detach(), self.centre.loss).cpu().numpy()
        for heat, mask in zip(heats, fg):
            m = match_peaks_to_objects(heatmap_peaks(heat, self.centre.peak_distance, self.centre.peak_threshold), mask)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        return tp, fp, fn

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with torch.no_grad():
            output = self.network(data)
            loss = self.loss(output, target)
        tp, fp, fn = self._detections(output, target)
        n = len(self.label_manager.foreground_regions if self.label_manager.has_regions
                else self.label_manager.foreground_labels)
        # nnU-Net's pseudo Dice (2tp / (2tp + fp + fn)) becomes the centre-detection F1, per class slot
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": np.full(n, tp, float), "fp_hard": np.full(n, fp, float),
                "fn_hard": np.full(n, fn, float)}

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"centre heatmap: {self.centre.loss} loss, sigma {self.centre.sigma} px (coarse grid), "
                               f"peaks >= "
                               f"{self.centre.peak_threshold}, {self.centre.peak_distance} px apart; 'Pseudo dice' "
                               f"below = centre-detection F1", also_print_to_console=True)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Predict the heatmap of every validation case of the fold (nnU-Net's sliding window on the
        preprocessed coarse case), score the peaks slice by slice against the objects."""
        depth = self.uses_depth_channel(self.configuration_manager)
        predictor = validation_predictor(self, nnUNetPredictor)
        spacing = np.asarray(self.configuration_manager.spacing[-2:], dtype=float)
        per_case = {}
        for k, data, seg, _ in validation_cases(self, depth):
            heat = centre_probability(predictor.predict_sliding_window_return_logits(data)[0], self.centre.loss).cpu()
            fg = label_foreground(seg[0], self.label_manager.ignore_label)
            counts = {"tp": 0, "fp": 0, "fn": 0, "distances": [], "heights": [], "hits": []}
            for z in range(fg.shape[0]):
                m = match_peaks_to_objects(heatmap_peaks(heat[z], self.centre.peak_distance,
                                                         self.centre.peak_threshold), fg[z])
                for key in ("tp", "fp", "fn"):
                    counts[key] += m[key]
                counts["distances"] += m["distances"]
                low, heights = heatmap_peaks(heat[z], self.centre.peak_distance, CALIBRATION_FLOOR, with_heights=True)
                counts["heights"] += heights.tolist()
                counts["hits"] += peak_hits(low, fg[z]).tolist()
            per_case[k] = counts
        per_case = gather_on_rank0(self, per_case)
        if per_case is not None:
            tp, fp, fn = (sum(c[key] for c in per_case.values()) for key in ("tp", "fp", "fn"))
            distances = np.array([d for c in per_case.values() for d in c["distances"]])
            summary = {
                "precision": tp / (tp + fp) if tp + fp else float("nan"),
                "recall": tp / (tp + fn) if tp + fn else float("nan"),
                "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
                "tp": tp, "fp": fp, "fn": fn,
                "median_distance_px": float(np.median(distances)) if len(distances) else float("nan"),
                "median_distance_mm": float(np.median(distances) * spacing.mean()) if len(distances) else float("nan"),
                "sigma_px": self.centre.sigma, "peak_threshold": self.centre.peak_threshold, "loss": self.centre.loss,
                "calibration": calibration_table([h for c in per_case.values() for h in c["heights"]],
                                                 [t for c in per_case.values() for t in c["hits"]]),
                "per_case": {k: {key: v[key] for key in ("tp", "fp", "fn")} for k, v in per_case.items()},
            }
            out_dir = join(self.output_folder, "validation")
            maybe_mkdir_p(out_dir)
            write_json_atomic(summary, join(out_dir, "summary_centres.json"))
            self.print_to_log_file(f"Centre validation: precision {summary['precision']:.3f}, recall "
                                   f"{summary['recall']:.3f}, F1 {summary['f1']:.3f}, median distance to the object "
                                   f"centroid {summary['median_distance_px']:.2f} px", also_print_to_console=True)


__all__ = ["nnUNetTrainer_StSCentre", "HeatmapFocalLoss", "HeatmapMSELoss", "target_foreground"]
