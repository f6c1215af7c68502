"""The `sts` block that segment-then-segment keeps in an nnU-Net configuration.

nnU-Net keeps unknown configuration keys (``ConfigurationManager.configuration``), so every
parameter of the method lives in the dataset's plans next to the standard configurations and is
copied with them into each results folder: training and prediction read the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nnunet_stseg.geometry import CropParams

STS_KEY = "sts"
DEFAULT_COARSE_TRAINER = "nnUNetTrainer_StSCoarse"
DEFAULT_FINE_TRAINER = "nnUNetTrainer_StSFine"
FALLBACKS = ("coarse", "whole")


def grid_spacing3(spacing) -> list[float]:
    """Spacing of a configuration's preprocessed grid on all 3 axes of nnU-Net's (z, y, x) data.
    A 2D configuration has 2 values; its slice axis is inactive in every crop computation, so the
    value used for it (1) never matters."""
    sp = [float(v) for v in spacing]
    return sp if len(sp) == 3 else [1.0] + sp


def coarse_config_name(dim: str, size: int) -> str:
    """Name of the coarse configuration, e.g. ``3d_sts_coarse_64``."""
    return f"{dim}_sts_coarse_{int(size)}"


def fine_config_name(dim: str, size: int) -> str:
    """Name of the fine configuration, e.g. ``3d_sts_fine_64``."""
    return f"{dim}_sts_fine_{int(size)}"


@dataclass
class StSConfig:
    """Parameters of one segment-then-segment pipeline (stored in the fine configuration).

    - ``input_size``: S, the fine (and coarse) network input size per axis.
    - ``coarse_configuration`` / ``coarse_trainer``: where the coarse model is found, by
      convention ``nnUNet_results/<dataset>/<coarse_trainer>__<plans>__<coarse_configuration>``.
    - ``crop``: see :class:`nnunet_stseg.geometry.CropParams`.
    - ``fallback``: what a case with no usable coarse component gets: ``coarse`` (the coarse
      prediction, i.e. background) or ``whole`` (the fine network on the whole image/slices).
    - ``crops_per_batch``: crops per fine forward pass at inference.
    - ``max_crops``: crops per case before intersecting boxes are merged and, if still too many,
      only the largest are kept (a guard against speckled coarse masks; logged).
    """

    role: Literal["coarse", "fine"]
    input_size: int
    coarse_configuration: str
    coarse_trainer: str = DEFAULT_COARSE_TRAINER
    crop: CropParams | None = None
    fallback: str = "coarse"
    crops_per_batch: int = 16
    max_crops: int = 64
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"role": self.role, "input_size": int(self.input_size),
             "coarse_configuration": self.coarse_configuration, "coarse_trainer": self.coarse_trainer,
             "fallback": self.fallback, "crops_per_batch": int(self.crops_per_batch),
             "max_crops": int(self.max_crops)}
        if self.crop is not None:
            d["crop"] = self.crop.to_dict()
        d.update(self.extra)
        return d

    @classmethod
    def from_configuration(cls, configuration: dict, where: str = "configuration") -> "StSConfig":
        """Read the block from a configuration dict; a clear error if it is missing or broken."""
        block = configuration.get(STS_KEY)
        if block is None:
            raise ValueError(
                f"{where} has no '{STS_KEY}' block: it was not planned for segment-then-segment. "
                f"Run `nnunet-stseg plan -d DATASET -s SIZE` first and train with the configurations it prints.")
        block = dict(block)
        crop = block.pop("crop", None)
        known = {"role", "input_size", "coarse_configuration", "coarse_trainer", "fallback", "crops_per_batch",
                 "max_crops"}
        extra = {k: block.pop(k) for k in list(block) if k not in known}
        cfg = cls(crop=CropParams.from_dict(crop) if crop is not None else None, extra=extra, **block)
        if cfg.fallback not in FALLBACKS:
            raise ValueError(f"{where}: sts.fallback must be one of {FALLBACKS}, got {cfg.fallback!r}")
        if int(cfg.max_crops) < 1 or int(cfg.crops_per_batch) < 1:
            raise ValueError(f"{where}: sts.max_crops and sts.crops_per_batch must be >= 1")
        if cfg.role == "fine" and cfg.crop is None:
            raise ValueError(f"{where}: fine configuration without sts.crop parameters")
        return cfg
