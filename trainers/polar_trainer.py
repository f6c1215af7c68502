"""nnU-Net trainer for the polar stage (methods.md section 3 and 3b): ``nnUNetTrainer_StSPolar``.

Trained with the stock ``nnUNetv2_train D 2d_sts_polar_<S> F -tr nnUNetTrainer_StSPolar`` on the
polar configuration that ``nnunet-stseg plan --polar`` adds; predicts with the stock
``nnUNetv2_predict ... -tr nnUNetTrainer_StSPolar`` (:class:`~nnunet_stseg.adapters.polar_predictor.PolarPredictor`,
origins from the coarse model ``2d_sts_coarse_<S>`` of the same folds).

Training samples: one polar image per batch element, around ONE ground-truth connected component
of a random slice/case (so images with several objects are over-sampled, as in the paper), origin
at its centroid, centre augmentation drawn anew every sample, random rotation = random start angle
(a cyclic shift of the angle axis, exact and continuous). A case without foreground gives a polar
image around a uniformly random origin with an empty label (teaches "nothing here" for false
coarse components).

Augmentation in polar space, configured explicitly:
- rotation: our random start angle; nnU-Net's in-plane rotation is switched OFF (a Cartesian
  rotation of the polar image would mix angle and radius);
- scaling: OFF (scaling the angle axis breaks its 2 pi period);
- mirroring: the angle axis only (axis 0 = a Cartesian reflection across a line through the
  origin); never the radius axis (it would move the origin to the border). The same holds for
  test-time mirroring;
- intensity augmentations (noise, blur, brightness, contrast, low resolution, gamma): nnU-Net's own.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_stseg.adapters.config import DEFAULT_CENTRE_TRAINER, PolarParams
from nnunet_stseg.adapters.polar_predictor import PolarPredictor
from nnunet_stseg.adapters.results import model_folder
from nnunet_stseg.core.polar import component_centroids, shift_origin, to_polar
from nnunet_stseg.trainers.loaders import ResampledSampleLoader, build_dataloaders
from nnunet_stseg.trainers.sts_trainers import nnUNetTrainer_StSFine


class PolarSampleLoader(ResampledSampleLoader):
    """One polar image per batch element (see the module docstring). ``augment`` = centre shift
    and random start angle (training); off for the validation loader."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, polar: PolarParams,
                 transforms=None, depth_slice_axis: int | None = None, augment: bool = True):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager, transforms=transforms,
                         depth_slice_axis=depth_slice_axis)
        self.polar = polar
        self.augment = augment
        self._centroid_cache: dict[str, np.ndarray] = {}

    def gt_origins(self, key: str, seg) -> np.ndarray:
        """(N, 3) ``(z, y, x)`` centroids of the case's ground-truth components (per slice)."""
        if key not in self._centroid_cache:
            self._centroid_cache[key] = component_centroids(self.foreground(seg))[0]
        return self._centroid_cache[key]

    def sample_origin(self, key: str, seg, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Origin ``(z, y, x)`` and start angle of one training sample."""
        shape = seg.shape[1:]
        origins = self.gt_origins(key, seg)
        if len(origins):
            origin = origins[rng.integers(len(origins))].copy()
        else:
            origin = np.array([rng.integers(shape[0]), rng.uniform(0, shape[1] - 1), rng.uniform(0, shape[2] - 1)])
        if not self.augment:
            return origin, 0.0
        origin = shift_origin(origin, shape[1:], rng, self.polar.centre_shift_probability,
                              self.polar.centre_shift_fraction)
        return origin, float(rng.uniform(0, 2 * math.pi))

    def make_sample(self, key, data, seg, properties, rng):
        origin, theta0 = self.sample_origin(key, seg, rng)
        z = int(origin[0])
        plane = torch.from_numpy(np.asarray(data[:, z], dtype=np.float32))
        labels = torch.from_numpy(np.asarray(seg[:, z], dtype=np.float32))
        img, _ = to_polar(plane, origin[None, 1:], self.polar.polar_shape, "linear", theta0=theta0)
        lab, _ = to_polar(labels, origin[None, 1:], self.polar.polar_shape, "nearest", theta0=theta0)
        return img[0][:, None], lab[0][:, None].round().to(torch.int16), z


class nnUNetTrainer_StSPolar(nnUNetTrainer_StSFine):
    """Polar stage: trains on polar images around ground-truth components, validates the whole
    pipeline (coarse fold model -> origins -> polar network -> fusion) in Cartesian space against
    the original labels."""

    predictor_class = PolarPredictor
    sts_role = "polar"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 2:
            raise ValueError(f"{self.__class__.__name__} needs a 2D configuration, '{configuration}' has patch "
                             f"{self.configuration_manager.patch_size}")
        if tuple(self.configuration_manager.patch_size) != tuple(self.sts.polar.polar_shape):
            raise ValueError(f"configuration '{configuration}': patch {self.configuration_manager.patch_size} differs "
                             f"from sts.polar.polar_shape {list(self.sts.polar.polar_shape)}")

    def companion_folders(self) -> dict[str, str]:
        """The coarse model and the centre-point model (heatmap origins; embedded whenever it exists,
        since ``STSEG_OVERRIDES=polar.origin_source=heatmap`` can ask for it at prediction time)."""
        centre = model_folder(self.plans_manager.dataset_name, DEFAULT_CENTRE_TRAINER, self.sts.coarse_configuration,
                              self.plans_manager.plans_name)
        return {**super().companion_folders(), "centre": str(centre)}

    def companion_required(self, name: str) -> bool:
        return name != "centre" or self.sts.polar.origin_source == "heatmap"

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # rotation is our random start angle (exact); mirroring only along the angle axis
        mirror_axes = (0,)
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file("polar augmentation: random start angle, angle-axis mirroring, no nnU-Net "
                               "rotation/scaling")
        return (0.0, 0.0), False, np.array(self.configuration_manager.patch_size), mirror_axes

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        transforms = nnUNetTrainer.get_training_transforms(*args, **kwargs)
        for t in transforms.transforms:
            if isinstance(t, SpatialTransform):
                t.p_rotation = 0.0
                t.p_scaling = 0.0
        return transforms

    def get_dataloaders(self):
        # the polar image is the patch itself (no rotation margin: rotation is the start angle)
        patch = self.configuration_manager.patch_size
        return build_dataloaders(self, lambda dataset, _, __, transforms, train: PolarSampleLoader(
            dataset, self.batch_size, patch, patch, self.label_manager, self.sts.polar, transforms=transforms,
            depth_slice_axis=self.depth_slice_axis(), augment=train))


__all__ = ["nnUNetTrainer_StSPolar", "PolarSampleLoader"]
