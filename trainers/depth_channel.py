"""Depth channel in nnU-Net training: one mixin for all of our trainers (methods.md section 4).

The channel is switched on by the trainer class (``depth_channel_default``, e.g.
``nnUNetTrainer_Depth``) or by ``"depth_channel": true`` in the configuration (``nnunet-stseg plan
--depth`` sets it on the 2d segment-then-segment configurations), so variants compose without a
class per combination.

Training never stores the channel: the preprocessed data stays nnU-Net's (shared with the other
configurations). The data loader appends it to every sample AFTER nnU-Net's transforms, so
intensity normalisation and intensity augmentation never touch it, and a spatial augmentation of
a 2D slice (rotation, scaling, elastic, mirroring: all in-plane) cannot change a constant channel.
Its value is the depth of the slice the loader picked (see :mod:`nnunet_stseg.core.depth`).
"""
from __future__ import annotations

import functools

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_stseg.adapters.nnunet_hooks import adopt_predictor_from_caller
from nnunet_stseg.core.depth import DEPTH_KEY, append_depth_channel, check_depth_applicable, depths_from_properties
from nnunet_stseg.trainers.loaders import build_dataloaders


class _CaseRecorder:
    """Wraps an nnU-Net dataset; remembers the depths of the slices of the case loaded last (the
    loader loads one case, picks its patch, then transforms it)."""

    def __init__(self, dataset, slice_axis: int):
        self._dataset = dataset
        self.slice_axis = slice_axis
        self.depths: np.ndarray | None = None
        self.slice_index = 0

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        self.depths = depths_from_properties(data.shape[1], properties, slice_axis=self.slice_axis)
        self.slice_index = 0
        return data, seg, seg_prev, properties

    def current_depth(self) -> float:
        return float(self.depths[int(np.clip(self.slice_index, 0, len(self.depths) - 1))])

    def __getattr__(self, name):
        if name.startswith("__") or name == "_dataset":  # pickling looks these up before __dict__ is set
            raise AttributeError(name)
        return getattr(self._dataset, name)


class _AddDepthAfterTransforms:
    """nnU-Net's transforms, then the depth of the recorded slice as the last image channel."""

    def __init__(self, transforms, recorder: _CaseRecorder):
        self.transforms = transforms
        self.recorder = recorder

    def __call__(self, **sample):
        if self.transforms is not None:
            sample = self.transforms(**sample)
        sample["image"] = append_depth_channel(sample["image"], self.recorder.current_depth())
        return sample


class DepthChannelDataLoader(nnUNetDataLoader):
    """nnU-Net's 2D data loader (2D patches from 3D cases) whose samples get the depth channel."""

    def __init__(self, data, *args, slice_axis: int, transforms=None, **kwargs):
        recorder = _CaseRecorder(data, slice_axis)
        super().__init__(recorder, *args, transforms=_AddDepthAfterTransforms(transforms, recorder), **kwargs)
        self.recorder = recorder

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose: bool = False):
        lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        self.recorder.slice_index = int(lbs[0])  # 2D patch of a 3D case: one slice, the first axis
        return lbs, ubs


@functools.cache
def dataset_with_depth_channel(dataset_class: type, slice_axis: int) -> type:
    """A subclass of an nnU-Net dataset class whose ``load_case`` returns the case with its depth
    channel (for nnU-Net's own final validation, which predicts whole preprocessed cases);
    ``slice_axis`` as in :meth:`DepthChannelTrainerMixin.depth_slice_axis`."""

    def load_case(self, identifier):
        data, seg, seg_prev, properties = dataset_class.load_case(self, identifier)
        data = np.asarray(data[:])
        depths = depths_from_properties(data.shape[1], properties, slice_axis=slice_axis)
        return append_depth_channel(data, depths), seg, seg_prev, properties

    return type(f"{dataset_class.__name__}WithDepth{slice_axis}", (dataset_class,), {"load_case": load_case})


class DepthChannelTrainerMixin:
    """Adds the depth channel to a trainer when the class or the configuration asks for it.

    - network: one more input channel (``build_network_architecture``, also used by nnU-Net's
      predictor, which then appends the channel in its preprocessing: see
      :class:`nnunet_stseg.adapters.predictor.PluginPredictor`);
    - training: :class:`DepthChannelDataLoader` (channel added after the transforms);
    - final validation: nnU-Net's own, on cases with the channel appended.
    """

    depth_channel_default: bool = False
    predictor_class: type | None = None  # what nnU-Net's predictor becomes for our model (None: PluginPredictor)

    @classmethod
    def uses_depth_channel(cls, configuration_manager) -> bool:
        return bool(cls.depth_channel_default or configuration_manager.configuration.get(DEPTH_KEY, False))

    def depth_slice_axis(self) -> int | None:
        """The reader's array axis that nnU-Net made the slice axis (``transpose_forward[0]``: the
        depth channel is measured along it, in patient coordinates); None without a depth channel."""
        if not self.uses_depth_channel(self.configuration_manager):
            return None
        return int(self.plans_manager.transpose_forward[0])

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        depth = cls.uses_depth_channel(configuration_manager)
        # nnU-Net's predictor calls this while loading our model: give it our prediction behaviour
        adopt_predictor_from_caller(cls.predictor_class, depth=depth)
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                        num_input_channels + int(depth), num_output_channels,
                                                        enable_deep_supervision)

    def _check_depth_channel(self) -> None:
        """Called at the end of __init__: refuse configurations where depth has no meaning."""
        if self.uses_depth_channel(self.configuration_manager):
            plans = self.plans_manager.plans
            check_depth_applicable(self.configuration_manager.patch_size,
                                   plans.get("original_median_shape_after_transp", [1]),
                                   f"{self.__class__.__name__} on configuration '{self.configuration_name}' of "
                                   f"{self.plans_manager.dataset_name}")
            self.print_to_log_file("depth channel: ON (one extra input channel, normalised slice depth)")

    def get_dataloaders(self):
        if not self.uses_depth_channel(self.configuration_manager):
            return super().get_dataloaders()
        common = dict(oversample_foreground_percent=self.oversample_foreground_percent, sampling_probabilities=None,
                      pad_sides=None, probabilistic_oversampling=self.probabilistic_oversampling)
        return build_dataloaders(self, lambda dataset, patch, final_patch, transforms, train: DepthChannelDataLoader(
            dataset, self.batch_size, patch, final_patch, self.label_manager, transforms=transforms,
            slice_axis=self.depth_slice_axis(), **common))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not self.uses_depth_channel(self.configuration_manager):
            return super().perform_actual_validation(save_probabilities)
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        plain = self.dataset_class
        self.dataset_class = dataset_with_depth_channel(plain, self.depth_slice_axis())
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = plain


__all__ = ["DepthChannelTrainerMixin", "DepthChannelDataLoader", "dataset_with_depth_channel"]
