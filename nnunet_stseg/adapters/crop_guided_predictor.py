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
   output is mirrored back), returned as logits for nnU-Net's export.
"""
from __future__ import annotations

import contextlib
import itertools
import time

import numpy as np
import torch

from nnunet_stseg.adapters.config import E2EParams, StSConfig
from nnunet_stseg.adapters.predictor import PluginPredictor
from nnunet_stseg.core.crop_guided import CropGuidedNetwork
from nnunet_stseg.core.fusion import fuse_crops
from nnunet_stseg.core.geometry import nonlinearity, probabilities_to_logits


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

    def _model(self) -> CropGuidedNetwork:
        net = self.network._orig_mod if hasattr(self.network, "_orig_mod") else self.network
        if self.sts is None:
            self.sts = self.configure(net)
        return net

    def _mirror_sets(self) -> list[tuple[int, ...]]:
        """The flips of the TTA as axes of a (C, Z, Y, X) case: every subset of the allowed in-plane
        mirroring axes (nnU-Net's sliding window does the same on its windows), or none."""
        axes = self.allowed_mirroring_axes if self.use_mirroring and self.allowed_mirroring_axes else ()
        dims = [int(a) + 2 for a in axes]  # 2d configuration: axis 0 of the patch = Y of the case
        return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]

    def _one_pass(self, net: CropGuidedNetwork, image: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Fused fine probabilities (K, Z, Y, X) of a (C, Z, Y, X) case for the weights now loaded,
        and the number of boxes."""
        shape = tuple(image.shape[1:])
        per_batch = max(1, self.sts.crops_per_batch)
        fused = covered = None
        n_boxes = 0
        for z0 in range(0, shape[0], per_batch):
            slices = image[:, z0:z0 + per_batch].transpose(0, 1)  # (B, C, Y, X)
            with torch.autocast(self.device.type) if self.device.type == "cuda" else contextlib.nullcontext():
                out = net(slices.to(self.device))
            self.__dict__["_fallbacks"] = self.__dict__.get("_fallbacks", 0) + getattr(net, "last_fallbacks", 0)
            probs = nonlinearity(out.fine.float(), net.multilabel)[:, :, None]  # (N, K, 1, m, m)
            boxes = [np.concatenate([np.tile([[[z0 + b, z0 + b + 1]]], (len(bx), 1, 1)), bx], axis=1)
                     for b, bx in enumerate(out.boxes) if len(bx)]
            if not boxes:  # L-SNet: no keypoint on any of these slices
                continue
            boxes = np.concatenate(boxes)  # integer (the end-to-end model) or fractional (L-SNet's RoIs)
            n_boxes += len(boxes)
            fused, covered = fuse_crops(probs.to(image.device), boxes, shape, multilabel=net.multilabel,
                                        out=fused, covered=covered)
        if fused is None:  # nothing found on any slice: certain background
            fused = image.new_zeros((self.label_manager.num_segmentation_heads, *shape))
            if not net.multilabel:
                fused[0] = 1.0
        return fused, n_boxes

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """One case on the full-resolution grid (C, Z, Y, X) -> logits on that grid, on the CPU."""
        t0 = time.perf_counter()
        net = self._model().to(self.device)
        net.eval()
        work = self.device if self.perform_everything_on_device else torch.device("cpu")
        image = torch.as_tensor(data).to(work).float()
        params = self.list_of_parameters if self.list_of_parameters else [None]
        total, n = None, 0
        for p in params:
            if p is not None:
                net.load_state_dict(p)
            for dims in self._mirror_sets():
                probs, n_boxes = self._one_pass(net, image.flip(dims) if dims else image)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
                n += 1
        total /= n
        fallbacks = self.__dict__.pop("_fallbacks", 0)
        self.last_timings = {"seconds": time.perf_counter() - t0, "passes": n, "n_boxes": n_boxes,
                             "slices_without_keypoint": fallbacks}
        self._log(f"{self.model_name}: {n_boxes} box(es) per pass, {n} pass(es) (folds x mirroring), "
                  f"{self.last_timings['seconds']:.2f} s"
                  + (f"; {fallbacks} slice pass(es) without keypoint above the threshold (fallback "
                     f"'{net.fallback}')" if fallbacks else ""))
        return probabilities_to_logits(total, self.label_manager.has_regions, inplace=True).cpu()


__all__ = ["CropGuidedPredictor", "configure_network"]
