"""End-to-end crop-guided model inference as an nnU-Net predictor (methods.md section 2).

:class:`CropGuidedPredictor` is a :class:`~nnunet_stseg.adapters.predictor.PluginPredictor` (input
checks, failed cases reported and skipped, atomic writes, the stock ``nnUNetv2_predict`` with all
its options) that overrides only ``predict_logits_from_preprocessed_data``. The model is ONE
network (:class:`~nnunet_stseg.core.crop_guided.CropGuidedNetwork`, both modules in one checkpoint):
no companion model is looked up. Per case, on the full-resolution grid of the configuration (a 2D
image is one slice; a 3D volume is predicted slice by slice, ``crops_per_batch`` slices at a time):

1. the whole model on each slice: coarse module on the slice downscaled to m, boxes from its
   decision (``sts.e2e.box_rule``), crops + coarse probability -> fine module;
2. each crop's probabilities pasted back onto its box and fused (max over crops for foreground,
   :func:`~nnunet_stseg.core.fusion.fuse_crops`); outside every box: background (the thesis's
   model output is the fine module's, and the boxes hold all the coarse foreground);
3. averaged over folds and mirroring TTA (the whole model runs on the mirrored slice and its
   output is mirrored back; :mod:`~nnunet_stseg.adapters.passes`), returned as logits for
   nnU-Net's export; the boxes go to ``<case>.objects.json`` (``sts.objects_report``).

The full-resolution arrays live on ``work_device`` (the CPU with ``--not_on_device``), and a case
that does not fit on the device is predicted again with them on the CPU, as the cascade's.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from nnunet_stseg.adapters.config import E2EParams, StSConfig
from nnunet_stseg.adapters.passes import autocast, fold_weights, mirror_axis_sets, unwrapped
from nnunet_stseg.adapters.predictor import PluginPredictor
from nnunet_stseg.core.crop_guided import CropGuidedNetwork
from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import foreground_probability, nonlinearity, probabilities_to_logits


def configure_network(net: CropGuidedNetwork, configuration: dict, multilabel: bool, where: str
                      ) -> tuple[StSConfig, E2EParams]:
    """Check that ``configuration`` is an end-to-end one and give its network the output kind (the
    label manager's, which the network's builder does not see; the box parameters it got from the
    plans when it was built); returns the two blocks."""
    sts = StSConfig.for_role(configuration, "e2e", where, "the end-to-end model")
    e2e = sts.e2e or E2EParams()
    net.multilabel = bool(multilabel)
    return sts, e2e


class CropGuidedPredictor(PluginPredictor):
    """nnU-Net predictor for the end-to-end crop-guided model (see the module docstring)."""

    sts: StSConfig | None = None
    e2e: E2EParams | None = None
    last_timings: dict | None = None
    small_networks = True  # one network on the coarse grid and on crops

    model_name = "end-to-end model"

    def configure(self, net) -> StSConfig:
        """Give the loaded network its plan parameters; returns the ``sts`` block."""
        sts, self.e2e = configure_network(net, self.configuration_manager.configuration,
                                          self.label_manager.has_regions, f"the {self.model_name}'s configuration")
        return sts

    # per-run overrides (``STSEG_OVERRIDES``) that reach this model: the box rule's crop parameters,
    # slices per batch and the objects report; L-SNet's RoIs come from its own (built-in) block
    run_keys = ("crop.margin_fraction", "crop.margin_min", "crop.min_object_size", "crop.size_rule_grid",
                "crop.square", "crops_per_batch", "objects_report")

    def _model(self) -> CropGuidedNetwork:
        """The loaded network, given its plan values and the environment's per-run overrides once
        per loaded model; overrides this model does not use are named in the log, not applied."""
        net = unwrapped(self.network)
        if self.sts is None:
            self.sts, _ = self._with_run_overrides(self.configure(net))
            if hasattr(net, "crop"):  # the end-to-end network's box rule
                net.crop = self.sts.crop
        return net

    def _sts_config(self) -> StSConfig:
        self._model()
        return self.sts

    def _one_pass(self, net: CropGuidedNetwork, image: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Fused fine probabilities (K, Z, Y, X) of a (C, Z, Y, X) case for the weights now loaded,
        and the boxes (N, 3, 2) on the case's grid (a slice's boxes span that slice)."""
        shape = tuple(image.shape[1:])
        per_batch = max(1, self.sts.crops_per_batch)
        fused = covered = None
        found = [np.zeros((0, 3, 2))]
        for z0 in range(0, shape[0], per_batch):
            slices = image[:, z0:z0 + per_batch].transpose(0, 1)  # (B, C, Y, X)
            with autocast(self.device):
                out = net(slices.to(self.device))
            self.__dict__["_fallbacks"] = self.__dict__.get("_fallbacks", 0) + getattr(net, "last_fallbacks", 0)
            probs = nonlinearity(out.fine.float(), net.multilabel)[:, :, None]  # (N, K, 1, m, m)
            boxes = [np.concatenate([np.tile([[[z0 + b, z0 + b + 1]]], (len(bx), 1, 1)), bx], axis=1)
                     for b, bx in enumerate(out.boxes) if len(bx)]
            if not boxes:  # L-SNet: no keypoint on any of these slices
                continue
            boxes = np.concatenate(boxes)  # integer (the end-to-end model) or fractional (L-SNet's RoIs)
            found.append(boxes)
            fused, covered = fuse_crops(probs.to(image.device), boxes, shape, multilabel=net.multilabel,
                                        out=fused, covered=covered)
        if fused is None:  # nothing found on any slice: certain background
            fused = image.new_zeros((self.label_manager.num_segmentation_heads, *shape))
            if not net.multilabel:
                fused[0] = 1.0
        return fused, np.concatenate(found)

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One case on the full-resolution grid (C, Z, Y, X) -> logits on that grid, on the CPU (on
        the CPU again if it does not fit on the device: :meth:`_predict_case_or_on_cpu`)."""
        return self._predict_case_or_on_cpu(data)

    def _predict_case(self, data: torch.Tensor) -> torch.Tensor:
        """The whole model on every slice, once per fold (:func:`~.passes.fold_weights`) and
        mirroring of the whole case (:func:`~.passes.mirror_axis_sets`: the boxes depend on the
        image), probabilities averaged on :attr:`work_device`."""
        t0 = time.perf_counter()
        net = self._model().to(self.device)
        net.eval()
        self.__dict__.pop("_fallbacks", None)
        image = self._case_on_work_device(data)
        total, n, first = None, 0, None
        for _ in fold_weights(self, net):
            for dims in mirror_axis_sets(self, 2):  # 2d configuration: axis 0 of the patch = Y of the case
                probs, boxes = self._one_pass(net, image.flip(dims) if dims else image)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
                n += 1
                first = boxes if first is None else first  # the first fold's pass without mirroring
        total /= n
        n_boxes = len(boxes)
        fallbacks = self.__dict__.pop("_fallbacks", 0)
        self.last_timings = {"seconds": time.perf_counter() - t0, "passes": n, "n_boxes": n_boxes,
                             "slices_without_keypoint": fallbacks}
        self._log(f"{self.model_name}: {n_boxes} box(es) per pass, {n} pass(es) (folds x mirroring), "
                  f"{self.last_timings['seconds']:.2f} s"
                  + (f"; {fallbacks} slice pass(es) without keypoint above the threshold (fallback "
                     f"'{net.fallback}')" if fallbacks else ""))
        if self.sts.objects_report:
            self._keep_box_objects(total, first, n, fallbacks, getattr(net, "fallback", None))
        return probabilities_to_logits(total, self.label_manager.has_regions, inplace=True).cpu()

    def _keep_box_objects(self, probs: torch.Tensor, boxes: np.ndarray, passes: int, fallbacks: int,
                          fallback: str | None) -> None:
        """The case's objects report: one object per box (crop or RoI) of the first fold's pass
        without mirroring, with the foreground voxels and mean foreground probability of the
        averaged prediction inside it; the fallback: ``background`` when no box was found, the
        model's own (L-SNet) when a slice pass had no keypoint."""
        multilabel = self.label_manager.has_regions
        seg = self.label_manager.convert_probabilities_to_segmentation(probs).cpu().numpy() != 0
        fg = foreground_probability(probs, multilabel).cpu().numpy()
        voxels, mean = [], []
        for box in boxes:
            lo = np.floor(box[:, 0] + 1e-6).astype(int)
            hi = np.maximum(lo + 1, np.ceil(box[:, 1] - 1e-6).astype(int))
            region = tuple(slice(max(0, a), max(0, b)) for a, b in zip(lo, hi))
            voxels.append(int(seg[region].sum()))
            mean.append(float(fg[region].mean()) if fg[region].size else 0.0)
        self._keep_objects({"tight": boxes.reshape(-1, 3, 2), "voxels": np.asarray(voxels, np.int64),
                            "mean_probability": np.asarray(mean), "n_passes": passes,
                            "n_slice_passes_without_keypoint": fallbacks},
                           "background" if len(boxes) == 0 else (fallback if fallbacks else None))


__all__ = ["CropGuidedPredictor", "configure_network"]
