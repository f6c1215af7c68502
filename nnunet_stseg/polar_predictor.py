"""Polar-stage inference as an nnU-Net predictor (methods.md section 3 and 3b).

:class:`PolarPredictor` is an :class:`~nnunet_stseg.predictor.StSPredictor` (same coarse model
by convention, same folds, same nnU-Net preprocessing, export, ``--save_probabilities``,
``-num_parts``, ``--continue_prediction``, failure handling); only the per-case step differs:

1. coarse model -> foreground mask on the full-resolution grid (as the cascade);
2. origins = centroids of its connected components, per slice (2D images: the image), or, with
   origin source ``heatmap``, the peaks of the centre-point model (``nnUNetTrainer_StSCentre`` on
   the coarse configuration, same folds; ``STSEG_POLAR_ORIGINS`` overrides the plans' choice);
3. one polar image per origin (S angles x S radii, radius to the farthest image corner), all
   origins of the case in batches through the polar network (folds + mirroring TTA along the
   angle axis, which is a Cartesian reflection);
4. every prediction back to Cartesian space, then the multi-object fusion per slice: weight 2 on
   the predicted component holding the prediction's own origin, 1 on its other components; sum,
   normalise to [0, 1], hysteresis (t1, t2). The classes inside the fused mask are the weighted
   mean of the predictions' class probabilities (same weights, 1 off the origin's component).
5. A slice (or 2D image) without any origin keeps the coarse prediction there, and the log says
   so (with coarse origins such a slice only has components below the size rule, which become
   background as in the cascade).
"""
from __future__ import annotations

import os
from os.path import isdir, isfile, join

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_stseg.centres import heatmap_peaks
from nnunet_stseg.config import (DEFAULT_CENTRE_TRAINER, MAX_ORIGINS_ENV, ORIGIN_SOURCE_ENV, ORIGIN_SOURCES,
                                 PEAK_THRESHOLD_ENV, CentreParams)
from nnunet_stseg.geometry import foreground_from_probabilities, probabilities_to_logits
from nnunet_stseg.polar import (angle_seam_padding, component_centroids, from_polar, hysteresis_fusion,
                                origin_component_weights, to_polar, unwrap_angles, wrap_angles)
from nnunet_stseg.predictor import StSPredictor


def _env_override(name: str, parse, valid, expected: str):
    """The value of environment variable ``name`` parsed with ``parse``, None when unset or empty;
    a clear error naming the variable when it does not parse or is not ``valid``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name}={raw!r}: expected {expected}")
    return value


class PolarPredictor(StSPredictor):
    """nnU-Net predictor that runs coarse model -> origins -> polar network -> fusion per case."""

    sts_role = "polar"
    centre: nnUNetPredictor | None = None
    centre_params: CentreParams | None = None

    def origin_source(self) -> str:
        """``coarse`` or ``heatmap``: the plans' ``sts.polar.origin_source`` unless the environment
        variable ``STSEG_POLAR_ORIGINS`` says otherwise."""
        source = os.environ.get(ORIGIN_SOURCE_ENV) or self._sts_config().polar.origin_source
        if source not in ORIGIN_SOURCES:
            raise ValueError(f"{ORIGIN_SOURCE_ENV}={source!r}: the polar origin source must be one of {ORIGIN_SOURCES}")
        return source

    def max_origins(self) -> int:
        """Origins per slice: the plans' ``sts.polar.max_origins`` unless ``STSEG_POLAR_MAX_ORIGINS``
        says otherwise (1 suits data with one object per slice: a stray coarse fragment then gives
        no polar view of its own)."""
        value = _env_override(MAX_ORIGINS_ENV, int, lambda v: v >= 1, "a whole number >= 1 (origins per slice)")
        return int(self._sts_config().polar.max_origins) if value is None else value

    def peak_threshold(self) -> float | None:
        """Heatmap value from which a local maximum is an origin: the centre model's
        ``sts.centre.peak_threshold`` unless ``STSEG_POLAR_PEAK_THRESHOLD`` says otherwise; 0 means
        no threshold (None), so that with ``STSEG_POLAR_MAX_ORIGINS=1`` every slice gets the
        heatmap's maximum (the paper's argmax rule, for data with one object per image)."""
        value = _env_override(PEAK_THRESHOLD_ENV, float, lambda v: 0 <= v < 1,
                              "a number in [0, 1) (0 = no threshold)")
        if value is None:
            return float(self.centre_params.peak_threshold)
        return value if value > 0 else None

    def _angle_stride(self) -> int:
        """Total stride of the polar network along the angle axis (input sizes must be multiples)."""
        strides = self.configuration_manager.network_arch_init_kwargs.get("strides") or [1]
        return int(np.prod([s if isinstance(s, int) else s[0] for s in strides]))

    def centre_model_folder(self) -> str:
        from nnunetv2.paths import nnUNet_results

        sts = self._sts_config()
        return join(str(nnUNet_results), self.plans_manager.dataset_name,
                    f"{DEFAULT_CENTRE_TRAINER}__{self.plans_manager.plans_name}__{sts.coarse_configuration}")

    def attach_coarse(self, folds, checkpoint_name: str = "checkpoint_final.pth",
                      coarse_folder: str | None = None) -> None:
        """The coarse model (always: it is the fallback) and, for heatmap origins, the centre model
        of the same folds."""
        super().attach_coarse(folds, checkpoint_name, coarse_folder)
        if self.origin_source() == "heatmap":
            self.attach_centre(folds, checkpoint_name)

    def attach_centre(self, folds, checkpoint_name: str = "checkpoint_final.pth", centre_folder: str | None = None):
        """Load the centre-point model from ``centre_folder`` or its conventional results folder."""
        sts = self._sts_config()
        folder = centre_folder or self.centre_model_folder()
        missing = [f for f in (folds or [])
                   if not isfile(join(folder, f"fold_{f}", checkpoint_name))] if isdir(folder) else list(folds or ["F"])
        if missing or not isdir(folder):
            raise FileNotFoundError(
                f"heatmap origins need the centre-point model {folder}/fold_{missing[0] if missing else 'F'}, which "
                f"does not exist. Train it with: nnUNetv2_train {self.plans_manager.dataset_name} "
                f"{sts.coarse_configuration} {missing[0] if missing else 'FOLD'} -tr {DEFAULT_CENTRE_TRAINER} -p "
                f"{self.plans_manager.plans_name} (or predict with {ORIGIN_SOURCE_ENV}=coarse)")
        centre = nnUNetPredictor(tile_step_size=self.tile_step_size, use_gaussian=self.use_gaussian,
                                 use_mirroring=self.use_mirroring,
                                 perform_everything_on_device=self.perform_everything_on_device,
                                 device=self.device, verbose=False, allow_tqdm=False)
        centre.stseg_centre_model = True  # the centre trainer refuses to be loaded for segmentation otherwise
        centre.initialize_from_trained_model_folder(folder, list(folds) if folds is not None else None, checkpoint_name)
        self.centre_params = CentreParams.from_dict(centre.configuration_manager.configuration["sts"]["centre"])
        self.centre = centre
        self.peak_threshold()  # a bad override fails before the first case, not in the middle of a batch
        self._log(f"centre-point model: {folder} folds {folds}")

    def origins(self, foreground: np.ndarray) -> np.ndarray:
        """(N, 3) ``(z, y, x)`` origins from a (Z, H, W) coarse foreground mask."""
        pp = self._sts_config().polar
        origins, _ = component_centroids(foreground, pp.min_object_size, self.max_origins())
        return origins

    def heatmap_origins(self, data: torch.Tensor) -> np.ndarray:
        """(N, 3) ``(z, y, x)`` origins on the full-resolution grid: peaks of the centre model's
        heatmap on the coarse grid, slice by slice, mapped with the half-pixel convention."""
        cp, limit, threshold = self.centre_params, self.max_origins(), self.peak_threshold()
        centre_in = torch.from_numpy(np.ascontiguousarray(self._coarse_input(data, self.centre)))
        heat = self.centre.predict_logits_from_preprocessed_data(centre_in)[0].float().cpu().numpy()
        full = np.asarray(data.shape[2:], dtype=float)
        scale = full / np.asarray(heat.shape[1:], dtype=float)
        out = []
        for z in range(heat.shape[0]):
            peaks = heatmap_peaks(heat[z], cp.peak_distance, threshold, max_peaks=limit)
            if len(peaks):
                yx = np.clip((peaks + 0.5) * scale - 0.5, 0, full - 1)
                out.append(np.concatenate([np.full((len(yx), 1), z, dtype=float), yx], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 3))

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        sts = self._sts_config()
        pp = sts.polar
        self._ensure_coarse()
        lm = self.label_manager
        multilabel = lm.has_regions
        t0 = self._clock()

        probs = self.coarse_probabilities(data)  # (K, Z, H, W) on the device
        foreground = foreground_from_probabilities(probs, multilabel).cpu().numpy()
        source = self.origin_source()
        if source == "heatmap":
            if self.centre is None:
                self.attach_centre(*self._model_source())
            origins = self.heatmap_origins(data)
        else:
            origins = self.origins(foreground)
        t1 = self._clock()
        z_with = sorted({int(z) for z in origins[:, 0]})
        # slices without any origin keep the coarse prediction; with coarse origins their components
        # are all below the size rule, which makes them background as in the cascade
        no_origin = np.ones(foreground.shape[0], bool)
        no_origin[z_with] = False
        kept_coarse = 0
        if source == "coarse":
            dropped = torch.as_tensor(foreground & no_origin[:, None, None], device=probs.device)
            probs[:, dropped] = 0.0
            if not multilabel:
                probs[0, dropped] = 1.0
        else:
            kept_coarse = int(foreground[no_origin].any(axis=(1, 2)).sum())
        if len(origins) == 0:
            why = ("no heatmap peak" if source == "heatmap" else
                   "empty coarse mask or every component below the size rule")
            self._log(f"no origin ({why}): coarse prediction kept")
            self.last_timings = {"coarse_s": t1 - t0, "geometry_s": 0.0, "fine_s": 0.0, "n_origins": 0,
                                 "fallback": "coarse"}
            return probabilities_to_logits(probs, multilabel, inplace=True).cpu()
        self._log(f"{len(origins)} origin(s) ({source}) in {len(z_with)} slice(s)"
                  + (f"; {kept_coarse} slice(s) with coarse foreground but no heatmap peak keep the coarse "
                     f"prediction" if kept_coarse else ""))

        shape = tuple(data.shape[1:])
        image = data.to(self.device).float()
        k = probs.shape[0]
        score = np.zeros(shape, np.float32)
        class_sum = torch.zeros((k, *shape), dtype=torch.float32, device=self.device)
        weight_sum = torch.zeros(shape, dtype=torch.float32, device=self.device)
        geometry_s = fine_s = 0.0
        seam = angle_seam_padding(pp.polar_shape[0], pp.seam_padding_fraction, self._angle_stride())
        for start in range(0, len(origins), sts.crops_per_batch):
            chunk = origins[start:start + sts.crops_per_batch]
            ta = self._clock()
            polar, radii = to_polar(image, chunk, pp.polar_shape, "linear")
            tb = self._clock()
            logits = unwrap_angles(self._forward_fine(wrap_angles(polar, seam)), seam)
            p = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
            tc = self._clock()
            cart = from_polar(p, chunk[:, 1:], shape[1:], radii, mode="linear")  # (n, K, H, W)
            predicted = (cart > 0.5).any(dim=1) if multilabel else cart.argmax(dim=1) > 0
            weights = origin_component_weights(predicted.cpu().numpy(), chunk[:, 1:])
            for i, z in enumerate(chunk[:, 0].astype(int)):
                score[z] += weights[i]
                w = torch.as_tensor(np.where(weights[i] == 2, 2.0, 1.0).astype(np.float32), device=self.device)
                class_sum[:, z] += w * cart[i]
                weight_sum[z] += w
            geometry_s += (tb - ta) + (self._clock() - tc)
            fine_s += tc - tb

        td = self._clock()
        for z in z_with:
            mask = torch.as_tensor(hysteresis_fusion(score[z], pp.fusion_low, pp.fusion_high)[0], device=self.device)
            mean = class_sum[:, z] / weight_sum[z].clamp_min(1e-6)
            if multilabel:
                fused = torch.where(mask, mean, torch.zeros_like(mean))
                # inside the fused mask at least one region must say foreground
                top, idx = fused.max(dim=0)
                lift = mask & (top <= 0.5)
                fused.scatter_(0, idx[None], torch.where(lift, torch.full_like(top, 0.5 + 1e-3), top)[None])
            else:
                fg = mean[1:] / mean[1:].sum(dim=0, keepdim=True).clamp_min(1e-6)
                fused = torch.zeros_like(mean)
                fused[0] = (~mask).float()
                fused[1:] = torch.where(mask, fg, torch.zeros_like(fg))
            probs[:, z] = fused
        geometry_s += self._clock() - td
        logits = probabilities_to_logits(probs, multilabel, inplace=True).cpu()
        self.last_timings = {"coarse_s": t1 - t0, "geometry_s": geometry_s, "fine_s": fine_s,
                             "n_origins": int(len(origins)), "fallback": None}
        return logits


__all__ = ["PolarPredictor"]
