"""Data loading shared by our trainers: nnU-Net's loader ingredients, a loader whose samples are
resampled (crops, polar images) rather than cut, and the augmenter set-up nnU-Net uses.

A trainer with its own sampling implements :meth:`ResampledSampleLoader.make_sample` and builds its
loaders with :func:`build_dataloaders`; batching, nnU-Net's transforms, the depth channel and the
augmenter processes are here once.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from threadpoolctl import threadpool_limits

from nnunet_stseg.adapters.compat import check_nnunet
from nnunet_stseg.core.depth import append_depth_channel, depths_from_properties
from nnunet_stseg.core.geometry import label_foreground

check_nnunet()  # our loaders and trainers subclass nnU-Net's: check its interface once, clearly


def start_augmenters(trainer: nnUNetTrainer, dl_tr, dl_val):
    """Wrap our data loaders in nnU-Net's augmenter processes as nnU-Net does for its own loaders
    (``nnUNet_n_proc_DA`` workers; 0 = in-process) and start them."""
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        pin = trainer.device.type == "cuda"
        gen_tr = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=n_proc,
                                              num_cached=max(6, n_proc // 2), seeds=None, pin_memory=pin,
                                              wait_time=0.002)
        gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None, num_processes=max(1, n_proc // 2),
                                               num_cached=max(3, n_proc // 4), seeds=None, pin_memory=pin,
                                               wait_time=0.002)
    next(gen_tr), next(gen_val)
    return gen_tr, gen_val


def loader_ingredients(trainer: nnUNetTrainer) -> dict:
    """What nnU-Net's ``get_dataloaders`` builds before its loaders: transforms (nnU-Net's own
    methods), patch sizes and the train/val datasets of the fold."""
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    patch = trainer.configuration_manager.patch_size
    ds_scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm = trainer.label_manager
    label_kwargs = dict(is_cascaded=trainer.is_cascaded, foreground_labels=lm.foreground_labels,
                        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    tr_transforms = trainer.get_training_transforms(patch, rotation, ds_scales, mirror_axes, dummy_2d,
                                                    use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
                                                    **label_kwargs)
    val_transforms = trainer.get_validation_transforms(ds_scales, **label_kwargs)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    return dict(patch=patch, initial_patch=initial_patch, tr_transforms=tr_transforms, val_transforms=val_transforms,
                dataset_tr=dataset_tr, dataset_val=dataset_val)


def build_dataloaders(trainer: nnUNetTrainer, make_loader: Callable[..., object]):
    """nnU-Net's ``get_dataloaders`` with our loader class: ``make_loader(dataset, patch_size,
    final_patch_size, transforms, train)`` builds one loader; the training one gets nnU-Net's
    enlarged ``initial_patch`` (room for its rotation), the validation one the plain patch."""
    parts = loader_ingredients(trainer)
    patch = parts["patch"]
    dl_tr = make_loader(parts["dataset_tr"], parts["initial_patch"], patch, parts["tr_transforms"], True)
    dl_val = make_loader(parts["dataset_val"], patch, patch, parts["val_transforms"], False)
    return start_augmenters(trainer, dl_tr, dl_val)


class ResampledSampleLoader(nnUNetDataLoader):
    """nnU-Net's data loader whose samples are made by resampling (a crop, a polar image) rather
    than cut as patches: subclasses implement :meth:`make_sample`; batching, nnU-Net's transforms
    and the depth channel (appended after the transforms, never normalised or augmented) are here.

    Randomness comes from numpy's global generator like nnU-Net's own loader, so every DDP rank
    and every augmentation worker draws differently."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None,
                 depth_slice_axis: int | None = None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.depth_slice_axis = depth_slice_axis  # None: no depth channel (see DepthChannelTrainerMixin)
        self.ignore_label = label_manager.ignore_label

    def foreground(self, seg) -> np.ndarray:
        """Foreground of a case's segmentation (1, *spatial) without the ignore label."""
        return label_foreground(np.asarray(seg[0]), self.ignore_label)

    def make_sample(self, key: str, data, seg, properties, rng: np.random.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Image (C, *patch) float32, label (1, *patch) int16 (patch as ``self.patch_size``, 3
        axes for 2D configurations too) and the slice index the sample comes from."""
        raise NotImplementedError

    def generate_train_batch(self):
        keys = self.get_indices()
        rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        data_all = seg_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, properties = self._data.load_case(key)
                img, lab, slice_index = self.make_sample(key, data, seg, properties, rng)
                if self.patch_size_was_2d:
                    img, lab = img[:, 0], lab[:, 0]
                if self.transforms is not None:
                    out = self.transforms(image=img, segmentation=lab)
                    img, lab = out["image"], out["segmentation"]
                if self.depth_slice_axis is not None:  # after the transforms: never normalised or augmented
                    depths = depths_from_properties(data.shape[1], properties, slice_axis=self.depth_slice_axis)
                    img = append_depth_channel(img, depths[slice_index])
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *img.shape), dtype=torch.float32)
                data_all[j] = img
                if isinstance(lab, list):
                    if seg_all is None:
                        seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in lab]
                    for s_idx, s in enumerate(lab):
                        seg_all[s_idx][j] = s
                else:
                    if seg_all is None:
                        seg_all = torch.empty((self.batch_size, *lab.shape), dtype=lab.dtype)
                    seg_all[j] = lab
        return {"data": data_all, "target": seg_all, "keys": keys}


__all__ = ["start_augmenters", "loader_ingredients", "build_dataloaders", "ResampledSampleLoader"]
