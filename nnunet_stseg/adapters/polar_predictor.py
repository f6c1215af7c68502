"""Polar-stage inference as an nnU-Net predictor (methods.md section 3 and 3b).

:class:`PolarPredictor` is an :class:`~nnunet_stseg.adapters.predictor.StSPredictor` (same coarse model
by convention, same folds, same nnU-Net preprocessing, export, ``--save_probabilities``,
``-num_parts``, ``--continue_prediction``, failure handling); only the per-case step differs:

1. coarse model -> foreground mask on the full-resolution grid (as the cascade);
2. origins = centroids of its connected components, per slice (2D images: the image), or, with
   origin source ``heatmap``, the peaks of the centre-point model (``nnUNetTrainer_StSCentre`` on
   the coarse configuration, same folds; ``STSEG_OVERRIDES=polar.origin_source=...`` overrides the plans' choice);
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
   Origins must earn their place (``sts.polar.min_origin_confidence``): every candidate carries a
   confidence, the coarse component's mean foreground probability or the heatmap peak's height;
   those below the threshold are dropped, and a slice whose candidates were all dropped keeps the
   coarse prediction (logged). With ``sts.polar.confidence_weighting`` each view counts in the
   fusion with its origin's confidence as weight.
6. The objects report (``<case>.objects.json``): the output's components that hold an origin,
   with their origins, and how many origins the polar network rejected (nothing predicted there).
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_stseg.adapters.config import DEFAULT_CENTRE_TRAINER, CentreParams
from nnunet_stseg.adapters.predictor import StSPredictor, companion_logits
from nnunet_stseg.core.centres import centre_probability, heatmap_peaks
from nnunet_stseg.core.fusion import fuse_polar_slice, polar_fusion_weights
from nnunet_stseg.core.geometry import (foreground_from_probabilities, foreground_probability, nonlinearity,
                                        probabilities_to_logits, size_thresholds)
from nnunet_stseg.core.objects import objects_at_origins
from nnunet_stseg.core.polar import (angle_seam_padding, component_origins, from_polar, to_polar, unwrap_angles,
                                     wrap_angles)


class PolarPredictor(StSPredictor):
    """nnU-Net predictor that runs coarse model -> origins -> polar network -> fusion per case.

    The plans' ``sts.polar`` and ``sts.centre`` values may be replaced for a run by environment
    variables (:func:`nnunet_stseg.settings.plan_overrides`); they are applied once, when the model's
    configuration is read (and the centre model loaded), logged, and recorded next to the
    predictions."""

    sts_role = "polar"
    centre: nnUNetPredictor | None = None
    centre_params: CentreParams | None = None

    def origin_source(self) -> str:
        """``coarse`` or ``heatmap`` (``sts.polar.origin_source``, or its per-run override)."""
        return self._sts_config().polar.origin_source

    def max_origins(self) -> int:
        """Origins per slice (``sts.polar.max_origins``, or its per-run override; 1 suits data
        with one object per slice: a stray coarse fragment then gives no polar view of its own)."""
        return int(self._sts_config().polar.max_origins)

    def peak_threshold(self) -> float | None:
        """Heatmap value from which a local maximum is an origin (``sts.centre.peak_threshold`` of
        the centre model, or its per-run override); 0 means no threshold (None), so that
        with one origin per slice every slice gets the heatmap's maximum (the paper's argmax rule)."""
        value = float(self.centre_params.peak_threshold)
        return value if value > 0 else None

    def set_centre_params(self, params: CentreParams) -> None:
        """The centre model's parameters with the environment's override applied (once, logged)."""
        _, self.centre_params = self._with_run_overrides(self._sts_config(), params)

    def _angle_stride(self) -> int:
        """Total stride of the polar network along the angle axis (input sizes must be multiples)."""
        strides = self.configuration_manager.network_arch_init_kwargs.get("strides") or [1]
        return int(np.prod([s if isinstance(s, int) else s[0] for s in strides]))

    def attach_coarse(self, folds, checkpoint_name: str = "checkpoint_final.pth",
                      coarse_folder: str | None = None) -> None:
        """The coarse model (always: it is the fallback) and, for heatmap origins, the centre model
        of the same folds."""
        super().attach_coarse(folds, checkpoint_name, coarse_folder)
        if self.origin_source() == "heatmap":
            self.attach_centre(folds, checkpoint_name)

    def attach_centre(self, folds, checkpoint_name: str = "checkpoint_final.pth", centre_folder: str | None = None):
        """Load the centre-point model of the same folds from ``centre_folder`` if given, else as the
        coarse model is found (:meth:`~nnunet_stseg.adapters.predictor.StSPredictor._attach_companion`)."""
        # stseg_centre_model: the centre trainer refuses to be loaded for segmentation otherwise
        centre, source = self._attach_companion("centre", "heatmap origins need the centre-point model",
                                                DEFAULT_CENTRE_TRAINER, self._sts_config().coarse_configuration, folds,
                                                checkpoint_name, centre_folder,
                                                " (or predict with STSEG_OVERRIDES=polar.origin_source=coarse)",
                                                stseg_centre_model=True)
        self.set_centre_params(CentreParams.from_dict(centre.configuration_manager.configuration["sts"]["centre"]))
        self.centre = centre
        self._log(f"centre-point model: {source} folds {folds}")

    def _size_rule_grid(self) -> str:
        return self._sts_config().polar.size_rule_grid

    def origins(self, foreground: np.ndarray, probability: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) ``(z, y, x)`` origins from a (Z, H, W) coarse foreground mask on the full grid,
        and their confidences (N,): the mean of ``probability`` (the coarse foreground
        probability, same grid) over each component (1 without it).
        Components below the cascade's size rule give none: ``sts.polar.min_object_size`` voxels
        in-plane, counted on the grid ``sts.polar.size_rule_grid`` names (see
        :func:`nnunet_stseg.core.geometry.size_thresholds`), converted to full-grid pixels."""
        pp = self._sts_config().polar
        fine = np.asarray(self._fine_spacing3(), dtype=float)
        rule = self._rule_spacing3() or fine
        min_px = size_thresholds(rule, [False, True, True], pp.min_object_size)[1:] / fine[1:]
        origins, _, confidence = component_origins(foreground, probability, min_px, self.max_origins())
        return origins, np.ones(len(origins)) if probability is None else confidence

    def heatmap_origins(self, data: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) ``(z, y, x)`` origins on the full-resolution grid: peaks of the centre model's
        heatmap on the coarse grid, slice by slice, mapped with the half-pixel convention; and their
        confidences (N,), the peak heights."""
        cp, limit, threshold = self.centre_params, self.max_origins(), self.peak_threshold()
        centre_in = self._coarse_input(data, self.centre)
        ta = self._clock()
        heat = centre_probability(companion_logits(self.centre, centre_in)[0], cp.loss)
        self._add_seconds(centre_network=self._clock() - ta)
        heat = heat.cpu().numpy()
        full = np.asarray(data.shape[2:], dtype=float)
        scale = full / np.asarray(heat.shape[1:], dtype=float)
        out, heights = [], []
        for z in range(heat.shape[0]):
            peaks, h = heatmap_peaks(heat[z], cp.peak_distance, threshold, max_peaks=limit, with_heights=True)
            if len(peaks):
                yx = np.clip((peaks + 0.5) * scale - 0.5, 0, full - 1)
                out.append(np.concatenate([np.full((len(yx), 1), z, dtype=float), yx], axis=1))
                heights.append(h)
        return (np.concatenate(out), np.concatenate(heights)) if out else (np.zeros((0, 3)), np.zeros(0))

    def _origins_for_case(self, data: torch.Tensor, foreground: np.ndarray, probability: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) origins of one case from the plans' (or the environment's) origin source, with
        their confidences (N,)."""
        if self.origin_source() == "heatmap":
            if self.centre is None:
                self.attach_centre(*self._model_source())
            return self.heatmap_origins(data)
        return self.origins(foreground, probability)

    def _polar_passes(self, image: torch.Tensor, origins: np.ndarray, out: torch.Tensor, multilabel: bool,
                      view_weights: np.ndarray | None = None) -> tuple[float, float]:
        """Every origin's polar prediction, back in Cartesian space, fused per slice into ``out``
        (K, Z, H, W), the case's probabilities (:func:`~nnunet_stseg.core.fusion.fuse_polar_slice`
        of the slice's summed terms); returns the geometry and network seconds. Origins go through
        the network in batches of ``crops_per_batch``; a slice's sums (score on the host, class and
        weight sums on the image's device) exist only while its origins are in flight: the slice is
        fused once its last origin is in, so that with origins in slice order a few slices' sums are
        held, never a (K, Z, H, W) volume of them. ``view_weights`` (N,) weight each origin's view
        (None: all 1)."""
        sts = self._sts_config()
        pp = sts.polar
        shape = tuple(image.shape[1:])
        n_classes = out.shape[0]
        sums: dict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}  # z -> (score, class sum, weight sum)
        slices, per_slice = np.unique(origins[:, 0].astype(int), return_counts=True)
        pending = dict(zip(slices.tolist(), per_slice.tolist()))  # z -> origins not yet in its sums
        geometry_s = network_s = 0.0
        seam = angle_seam_padding(pp.polar_shape[0], pp.seam_padding_fraction, self._angle_stride())
        for start in range(0, len(origins), sts.crops_per_batch):
            chunk = origins[start:start + sts.crops_per_batch]
            ta = self._clock()
            polar, radii = to_polar(image, chunk, pp.polar_shape, "linear")
            tb = self._clock()
            logits = unwrap_angles(self._forward_fine(wrap_angles(polar, seam)), seam)
            p = nonlinearity(logits, multilabel)
            tc = self._clock()
            cart = from_polar(p, chunk[:, 1:], shape[1:], radii, mode="linear")  # (n, K, H, W)
            score_w, class_w = polar_fusion_weights(
                cart, chunk[:, 1:], multilabel,
                None if view_weights is None else view_weights[start:start + sts.crops_per_batch])
            for i, z in enumerate(chunk[:, 0].astype(int).tolist()):
                if z not in sums:
                    sums[z] = (np.zeros(shape[1:], np.float32),
                               torch.zeros((n_classes, *shape[1:]), dtype=torch.float32, device=image.device),
                               torch.zeros(shape[1:], dtype=torch.float32, device=image.device))
                score, class_sum, weight_sum = sums[z]
                score += score_w[i]
                class_sum += class_w[i] * cart[i]
                weight_sum += class_w[i]
                pending[z] -= 1
                if pending[z] == 0:  # the slice's last origin: fuse it, free its sums
                    out[:, z] = fuse_polar_slice(*sums.pop(z), multilabel, pp.fusion_low, pp.fusion_high)
            geometry_s += (tb - ta) + (self._clock() - tc)
            network_s += tc - tb
        return geometry_s, network_s

    def _keep_polar_objects(self, probs: torch.Tensor, multilabel: bool, origins: np.ndarray,
                            confidence: np.ndarray, fallback: str | None, n_unconfident: int) -> None:
        """The objects report of the case: the output's components that hold an origin, each
        origin with its confidence, and how many origins were dropped as not confident."""
        if self._sts_config().objects_report:
            found = objects_at_origins(foreground_from_probabilities(probs, multilabel).cpu().numpy(),
                                       foreground_probability(probs, multilabel).cpu().numpy(), origins, confidence)
            self._keep_objects({**found, "n_origins_below_confidence": n_unconfident}, fallback)

    def _predict_case(self, data: torch.Tensor) -> torch.Tensor:
        pp = self._sts_config().polar
        self._ensure_coarse()
        multilabel = self.label_manager.has_regions
        t0 = self._clock()

        probs = self.coarse_probabilities(data)  # (K, Z, H, W) on the work device, float32
        ta = self._clock()
        foreground = foreground_from_probabilities(probs, multilabel).cpu().numpy()
        source = self.origin_source()
        candidates, confidence = self._origins_for_case(
            data, foreground, foreground_probability(probs, multilabel).cpu().numpy() if source == "coarse" else None)
        confident = confidence >= pp.min_origin_confidence
        origins, confidence = candidates[confident], confidence[confident]
        n_unconfident = int((~confident).sum())
        t1 = self._clock()
        self._add_seconds(origins=t1 - ta - self.stage_seconds.get("centre_network", 0.0))
        z_with = sorted({int(z) for z in origins[:, 0]})
        # slices whose candidates all fell below the confidence threshold keep the coarse prediction
        z_unconfident = sorted({int(z) for z in candidates[~confident, 0]} - set(z_with))
        # slices without any origin keep the coarse prediction; with coarse origins their components
        # are all below the size rule, which makes them background as in the cascade
        no_origin = np.ones(foreground.shape[0], bool)
        no_origin[z_with] = False
        if source == "coarse":
            no_candidate = no_origin.copy()
            no_candidate[z_unconfident] = False
            dropped = torch.as_tensor(foreground & no_candidate[:, None, None], device=probs.device)
            probs[:, dropped] = 0.0
            if not multilabel:
                probs[0, dropped] = 1.0
            kept_coarse = int(foreground[z_unconfident].any(axis=(1, 2)).sum()) if z_unconfident else 0
        else:
            kept_coarse = int(foreground[no_origin].any(axis=(1, 2)).sum())
        unconfident_note = (f"; {n_unconfident} origin(s) below confidence {pp.min_origin_confidence} dropped"
                            if n_unconfident else "")
        if len(origins) == 0:
            why = ("every origin below the confidence threshold" if len(candidates) else
                   "no heatmap peak" if source == "heatmap" else
                   "empty coarse mask or every component below the size rule")
            self._log(f"no origin ({why}): coarse prediction kept")
            self.last_timings = {"coarse_s": t1 - t0, "geometry_s": 0.0, "fine_s": 0.0, "n_origins": 0,
                                 "fallback": "coarse"}
            self._add_seconds(geometry=self._clock() - t1)
            self._keep_polar_objects(probs, multilabel, origins, confidence, "coarse", n_unconfident)
            return probabilities_to_logits(probs, multilabel, inplace=True).cpu()
        lacking = "heatmap peak" if source == "heatmap" else "confident origin"
        self._log(f"{len(origins)} origin(s) ({source}) in {len(z_with)} slice(s)"
                  + (f"; {kept_coarse} slice(s) with coarse foreground but no {lacking} keep the coarse prediction"
                     if kept_coarse else "") + unconfident_note)

        geometry_s, fine_s = self._polar_passes(data.to(self.work_device).float(), origins, probs, multilabel,
                                                confidence if pp.confidence_weighting else None)
        self._add_seconds(geometry=geometry_s, polar_network=fine_s)
        self._keep_polar_objects(probs, multilabel, origins, confidence,
                                 "coarse in slices without origin" if kept_coarse else None, n_unconfident)
        logits = probabilities_to_logits(probs, multilabel, inplace=True).cpu()
        self.last_timings = {"coarse_s": t1 - t0, "geometry_s": geometry_s, "fine_s": fine_s,
                             "n_origins": int(len(origins)), "fallback": None}
        return logits


__all__ = ["PolarPredictor"]
