"""The `sts` block that our methods keep in an nnU-Net configuration.

nnU-Net keeps unknown configuration keys (``ConfigurationManager.configuration``), so every
parameter of the methods lives in the dataset's plans next to the standard configurations and is
copied with them into each results folder: training and prediction read the same numbers.

One shape: every parameter is ``sts.<key>`` or ``sts.<block>.<key>`` with the blocks ``crop``,
``polar``, ``centre``, ``e2e``, ``lsnet`` and ``sizes`` (:data:`BLOCKS`). ``nnunet-stseg plan --set
block.key=value`` writes them, ``STSEG_OVERRIDES=block.key=value,...`` replaces them for one
prediction; both are checked against the dataclasses here (:func:`parse_assignments`). Plans written
before 0.9 kept the end-to-end, L-SNet and size blocks beside ``sts`` (``sts_e2e``, ``sts_lsnet``,
``sts_sizes``); they still load (:meth:`PlanBlock.from_configuration`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, Literal, Sequence

from nnunet_stseg.core.cascade import FALLBACKS
from nnunet_stseg.core.centres import CENTRE_LOSSES
from nnunet_stseg.core.crop_guided import BOX_RULES
from nnunet_stseg.core.geometry import CropParams, checked_fields
from nnunet_stseg.core.lsnet import FALLBACKS as LSNET_FALLBACKS
from nnunet_stseg.core.lsnet import PAPER_MARGIN_FRACTION

STS_KEY = "sts"
DEFAULT_COARSE_TRAINER = "nnUNetTrainer_StSCoarse"
DEFAULT_FINE_TRAINER = "nnUNetTrainer_StSFine"
DEFAULT_POLAR_TRAINER = "nnUNetTrainer_StSPolar"
DEFAULT_CENTRE_TRAINER = "nnUNetTrainer_StSCentre"
ORIGIN_SOURCES = ("coarse", "heatmap")
ROLES = ("coarse", "fine", "polar", "e2e", "lsnet")
# how a coarse configuration's images are brought to its grid, in its training data and at prediction:
# "antialiased" = core.geometry.resample_image (torch, on the network's device; plans since 0.8),
# "nnunet" = the configuration's own nnU-Net resampling function (CPU spline; plans before 0.8)
COARSE_RESAMPLINGS = ("antialiased", "nnunet")
DEFAULT_COARSE_RESAMPLING = "antialiased"


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


def polar_config_name(size: int) -> str:
    """Name of the polar configuration (2D only), e.g. ``2d_sts_polar_64``."""
    return f"2d_sts_polar_{int(size)}"


@dataclass
class PolarParams:
    """Parameters of the polar stage (methods.md section 3), stored as ``sts.polar``.

    - ``polar_shape``: (angles, radii) samples of the polar image = the polar network's patch.
    - ``origin_source``: where inference origins come from: ``coarse`` = centroids of the
      connected components of the coarse model's mask (per slice); ``heatmap`` = peaks of the
      centre-point model (``nnUNetTrainer_StSCentre`` on the coarse configuration). The
      per-run override ``STSEG_OVERRIDES=polar.origin_source=heatmap`` changes it at prediction time.
    - ``centre_shift_probability`` / ``centre_shift_fraction``: training centre augmentation, with
      this probability shift y and x by a uniform value in +-fraction * min(H, W) (0.3, 0.05).
    - ``fusion_low`` / ``fusion_high``: hysteresis thresholds t1, t2 of the multi-object fusion.
    - ``min_object_size``: coarse components narrower than this many voxels in-plane give no
      origin (the 5-pixel rule of the cascade, along the finest in-plane axis).
    - ``size_rule_grid``: where those voxels are counted, as the cascade's ``crop.size_rule_grid``:
      ``full`` (default, the paper's rule) or ``coarse`` (the coarse model's grid).
    - ``max_origins``: origins per slice; more (a speckled coarse mask) keeps the largest
      components, with a log line.
    - ``seam_padding_fraction``: at inference the polar image gets this fraction of its angles
      as wrap-around context on each side of the angle axis (rounded up to the network's stride),
      so the network sees across the seam at angle 0; 0 switches it off (0.125).
    - ``min_origin_confidence``: an origin must earn its place: its confidence (a coarse
      component's mean foreground probability, a heatmap peak's height) must reach this value,
      else it is dropped; a slice whose origins were all dropped keeps the coarse (Cartesian)
      prediction, with a log line. 0 keeps every origin (the published method, default).
    - ``confidence_weighting``: each polar view counts in the fusion with its origin's
      confidence as weight (False: every view counts the same, the published method).
    """

    polar_shape: tuple[int, int]
    origin_source: str = "coarse"
    centre_shift_probability: float = 0.3
    centre_shift_fraction: float = 0.05
    fusion_low: float = 0.0
    fusion_high: float = 0.4
    min_object_size: float = 5.0
    max_origins: int = 32
    seam_padding_fraction: float = 0.125
    size_rule_grid: str = "full"
    min_origin_confidence: float = 0.0
    confidence_weighting: bool = False

    def __post_init__(self) -> None:
        self.polar_shape = tuple(int(v) for v in self.polar_shape)
        if len(self.polar_shape) != 2 or min(self.polar_shape) < 8:
            raise ValueError(f"polar_shape must be (angles, radii), each >= 8, got {self.polar_shape}")
        if self.origin_source not in ORIGIN_SOURCES:
            raise ValueError(f"origin_source must be one of {ORIGIN_SOURCES}, got {self.origin_source!r}")
        if not 0 <= self.centre_shift_probability <= 1 or not 0 <= self.centre_shift_fraction <= 0.5:
            raise ValueError("centre_shift_probability must be in [0, 1] and centre_shift_fraction in [0, 0.5]")
        if not 0 <= self.fusion_low <= self.fusion_high <= 1:
            raise ValueError(f"need 0 <= fusion_low <= fusion_high <= 1, got {self.fusion_low}, {self.fusion_high}")
        if int(self.max_origins) < 1 or self.min_object_size < 0:
            raise ValueError("max_origins must be >= 1 and min_object_size >= 0")
        if self.size_rule_grid not in ("full", "coarse"):
            raise ValueError(f"size_rule_grid must be 'full' or 'coarse', got {self.size_rule_grid!r}")
        if not 0 <= self.seam_padding_fraction <= 0.5:
            raise ValueError(f"seam_padding_fraction must be in [0, 0.5], got {self.seam_padding_fraction}")
        if not 0 <= self.min_origin_confidence < 1:
            raise ValueError(f"min_origin_confidence must be in [0, 1), got {self.min_origin_confidence}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["polar_shape"] = list(self.polar_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PolarParams":
        return cls(**checked_fields(cls, d, "polar"))


@dataclass
class CentreParams:
    """Centre-point heatmap model (origin source B), stored as ``sts.centre`` of the 2d coarse
    configuration when planned with ``--polar``. Lengths in pixels of the coarse grid.

    - ``sigma``: standard deviation of the Gaussian per object; default from the dataset's
      objects (:func:`nnunet_stseg.core.centres.default_sigma` of ``median_object_radius``).
    - ``peak_threshold``: a local maximum of the predicted heatmap is an origin from this value
      (0: every local maximum; with ``max_origins`` 1 the heatmap's maximum, the paper's argmax).
    - ``min_distance``: peaks closer than this are one peak (default: ``sigma``).
    - ``median_object_radius`` / ``objects_measured``: what the default was chosen from.
    - ``loss``: ``focal`` (CenterNet's penalty-reduced focal loss; the output's sigmoid is the
      heatmap, a probability of "a centre here") or ``mse`` (the relative squared error of the
      output itself; blocks written before 0.7 have no ``loss`` and were trained so).
    """

    sigma: float
    peak_threshold: float = 0.5
    min_distance: float | None = None
    median_object_radius: float | None = None
    objects_measured: int | None = None
    loss: str = "focal"

    def __post_init__(self) -> None:
        if not self.sigma > 0 or not 0 <= self.peak_threshold < 1:
            raise ValueError(f"centre parameters need sigma > 0 and 0 <= peak_threshold < 1, got {self}")
        if self.loss not in CENTRE_LOSSES:
            raise ValueError(f"centre loss must be one of {CENTRE_LOSSES}, got {self.loss!r}")

    @property
    def peak_distance(self) -> int:
        return max(1, int(round(self.min_distance if self.min_distance is not None else self.sigma)))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "CentreParams":
        """From a plans block; a block without ``loss`` (plans made before 0.7) is an ``mse`` model.

        >>> CentreParams.from_dict({"sigma": 2.0}).loss, CentreParams(sigma=2.0).loss
        ('mse', 'focal')
        """
        return cls(**{"loss": "mse", **checked_fields(cls, d, "centre")})


SIZES_KEY = "sizes"
DEFAULT_SIZES_TRAINER = "nnUNetTrainer_StSSizes"


def block_of(configuration: dict, key: str) -> dict | None:
    """The configuration's ``sts.<key>`` block, or the ``sts_<key>`` block beside ``sts`` that plans
    written before 0.9 have; None when neither is there."""
    block = (configuration.get(STS_KEY) or {}).get(key)
    return block if block is not None else configuration.get(f"{STS_KEY}_{key}")


def with_block(configuration: dict, key: str, block: dict) -> dict:
    """``configuration`` (changed in place and returned) with ``sts.<key>`` = ``block``; a legacy
    ``sts_<key>`` beside it is removed, so one place holds the values."""
    configuration.pop(f"{STS_KEY}_{key}", None)
    configuration.setdefault(STS_KEY, {})[key] = block
    return configuration


class PlanBlock:
    """A dataclass of method parameters kept as the block ``sts.<KEY>`` of the configuration it
    trains (``sts.sizes``, ``sts.e2e``, ``sts.lsnet``): written with :meth:`to_dict`, read with
    :meth:`from_configuration` (defaults when the block is absent; the legacy ``sts_<KEY>`` of
    plans before 0.9 too).

    >>> E2EParams.from_configuration({"sts": {"e2e": {"box_rule": "objects"}}}).box_rule
    'objects'
    >>> E2EParams.from_configuration({"sts_e2e": {"box_rule": "objects"}}).box_rule  # plans before 0.9
    'objects'
    """

    KEY: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_configuration(cls, configuration: dict, where: str = "configuration"):
        """The block of ``configuration`` (its defaults when absent); an unknown key or a bad value
        is an error naming ``where``."""
        try:
            return cls(**checked_fields(cls, block_of(configuration, cls.KEY) or {}, f"{STS_KEY}.{cls.KEY}"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def checked_canvas(canvas: Sequence[int] | None, key: str) -> list[int] | None:
    """A training canvas (in-plane size whole images are resampled to) as ints, each >= 8; None stays None."""
    if canvas is None:
        return None
    canvas = [int(c) for c in canvas]
    if any(c < 8 for c in canvas):
        raise ValueError(f"{key}.canvas must be >= 8 per axis, got {canvas}")
    return canvas


@dataclass
class SizeParams(PlanBlock):
    """Learning from object sizes (methods.md section 6; ``nnUNetTrainer_StSSizes``), stored as the
    ``sts.sizes`` block of the configuration it trains (defaults when the block is absent).

    - ``pretrain_epochs``: phase 1, pixel loss on the pixel-labelled cases only; None = half the
      schedule. Phase 2 (the rest) adds the size loss on the size-only cases.
    - ``size_weight``: weight of the size loss (the expected squared size error divided by the
      squared target size); 0 = pixel labels only (the same trainer, the comparison arm). 0.1 was
      chosen over 1 on validation images (docs/design.md "Learning from object sizes").
    - ``pixel_weight``: weight of nnU-Net's pixel loss on the labelled cases during phase 2 (kept:
      on the size loss alone the paper's IoU fell after ~20 epochs); 0 = the paper's phase 2.
    - ``samples``: Bernoulli samples per image for the gradient estimate (the paper: 1).
    - ``size_batch_size``: size-only images per phase-2 step (None: the configuration's batch).
    - ``mirror``: random flips of the size-only images (they keep the size; the paper used none).
    - ``initial_lr``: the training's initial learning rate (None: nnU-Net's 0.01). A phase 2 run
      from phase-1 weights (``pretrain_epochs`` 0, ``-pretrained_weights``) is a fine-tuning: at
      nnU-Net's 0.01 the first epoch undid much of the pre-training on hippocampus slices
      (docs/design.md "Learning from object sizes").
    """

    KEY = SIZES_KEY

    pretrain_epochs: int | None = None
    size_weight: float = 0.1
    pixel_weight: float = 1.0
    samples: int = 1
    size_batch_size: int | None = None
    mirror: bool = True
    initial_lr: float | None = None

    def __post_init__(self) -> None:
        if (self.pretrain_epochs is not None and int(self.pretrain_epochs) < 0) or self.size_weight < 0 \
                or self.pixel_weight < 0 or int(self.samples) < 1 \
                or (self.size_batch_size is not None and int(self.size_batch_size) < 1) \
                or (self.initial_lr is not None and not 0 < float(self.initial_lr) < 1):
            raise ValueError(f"sts.{SIZES_KEY} needs pretrain_epochs >= 0 (or null), weights >= 0, samples >= 1, "
                             f"size_batch_size >= 1 (or null) and 0 < initial_lr < 1 (or null), got {self}")



E2E_KEY = "e2e"
DEFAULT_E2E_TRAINER = "nnUNetTrainer_StSEndToEnd"


def e2e_config_name(dim: str, size: int) -> str:
    """Name of the end-to-end configuration, e.g. ``2d_sts_e2e_64`` (a copy of the fine one, role ``e2e``)."""
    return f"{dim}_sts_e2e_{int(size)}"


@dataclass
class E2EParams(PlanBlock):
    """The end-to-end crop-guided network (methods.md section 2; ``nnUNetTrainer_StSEndToEnd``),
    stored as the ``sts.e2e`` block of the configuration it trains (defaults when it is absent).
    The model's other parameters come from the configuration's ``sts`` block: the coarse
    configuration (both modules' architecture and input size m; its model of the same fold is the
    pre-trained start) and ``crop`` (context margin, size rule and squaring of per-object boxes).

    - ``box_rule``: ``all`` (the thesis: one box around all coarse foreground, the margin, clipped
      to the image, the whole image when the mask is empty) or ``objects`` (the cascade's boxes:
      one squared, padded box per coarse component, fused by max). ``all`` was chosen on the
      validation images (docs/design.md "End-to-end crop-guided network").
    - ``coarse_loss_weight`` / ``fine_loss_weight``: the loss is ``fine_loss_weight`` x nnU-Net's
      loss on the fine output (in the crop, against the label cut at the same box) plus
      ``coarse_loss_weight`` x the same loss on the coarse output (against the label downscaled,
      nearest): it keeps the coarse module a localiser.
    - ``canvas``: training samples are whole images (one slice of a volume) resampled to this
      in-plane size before nnU-Net's augmentation (batches need one size); None = the
      configuration's median image size, i.e. full resolution for the typical case.
    - ``pretrained``: start both modules from the coarse model of the same fold when it exists (the
      thesis's initialisation); False = from scratch.
    """

    KEY = E2E_KEY

    box_rule: str = "all"
    coarse_loss_weight: float = 1.0
    fine_loss_weight: float = 1.0
    canvas: list[int] | None = None
    pretrained: bool = True

    def __post_init__(self) -> None:
        if self.box_rule not in BOX_RULES:
            raise ValueError(f"sts.{E2E_KEY}.box_rule must be one of {BOX_RULES}, got {self.box_rule!r}")
        if self.coarse_loss_weight < 0 or self.fine_loss_weight <= 0:
            raise ValueError(f"sts.{E2E_KEY} needs coarse_loss_weight >= 0 and fine_loss_weight > 0, got {self}")
        self.canvas = checked_canvas(self.canvas, f"sts.{E2E_KEY}")


LSNET_KEY = "lsnet"
DEFAULT_LSNET_TRAINER = "nnUNetTrainer_StSLSNet"
LNET_TRAINER = "nnUNetTrainer_StSLNet"


def lsnet_config_name(size: int) -> str:
    """Name of the L-SNet configuration, e.g. ``2d_sts_lsnet_64`` (a copy of the 2d fine one, role ``lsnet``)."""
    return f"2d_sts_lsnet_{int(size)}"


@dataclass
class LSNetParams(PlanBlock):
    """L-SNet (methods.md section 5; ``nnUNetTrainer_StSLNet`` then ``nnUNetTrainer_StSLSNet``),
    stored as the ``sts.lsnet`` block of the configuration it trains (defaults when it is absent).
    L-Net takes the coarse configuration's architecture and input size m (the whole image
    downscaled), S-Net the configuration's own (the fine one's: patch S).

    - ``gamma``: factor on the S-Net loss's gradient into L-Net (the paper's decay factor: 0.1
      best of 0, 0.01, 0.1, 1; 0 = no joint training).
    - ``margin_fraction``: RoI margin as a fraction of the image's longer side (the paper's 15 px at
      512 px = 0.0293), so it scales with the image.
    - ``sigma``: the keypoint Gaussian's standard deviation in cells of L-Net's feature map.
    - ``feature_stride``: the decoder stage the heads sit on (the paper: 4; the nearest stage the
      architecture has is used and logged).
    - ``threshold``: keypoints at inference (heatmap probability; the paper: 0.5); ``top_k``: in
      training one of the top-k peaks is taken at random (the paper: 3).
    - ``dice_weight`` / ``box_loss_weight`` / ``segmentation_loss_weight``: L-Net's loss is focal +
      dice_weight x Dice on the heatmap + box_loss_weight x DIoU; S-Net's is
      segmentation_loss_weight x nnU-Net's loss in the RoI.
    - ``fallback``: an image with no keypoint above the threshold gets no RoI (``empty``, the paper's
      rule: background), one at its strongest peak (``best``) or the whole image (``whole``).
    - ``canvas``: in-plane size whole training images are resampled to (None: the median image size).
    - ``locator_from_coarse``: ``nnUNetTrainer_StSLNet`` starts L-Net's encoder-decoder from the
      coarse model of the same fold when it exists (False: from scratch, the same budget as the
      coarse model); its S-Net is ALWAYS the cascade's fine model of the fold (frozen): that
      model is the cascade with L-Net as its first stage. ``nnUNetTrainer_StSLSNet`` starts from it.
    - ``start_configuration``: the configuration whose ``nnUNetTrainer_StSLNet`` model of the same
      fold ``nnUNetTrainer_StSLSNet`` starts from (None: this one), so that variants (another gamma)
      share one L-Net.
    """

    KEY = LSNET_KEY

    gamma: float = 0.1
    margin_fraction: float = round(PAPER_MARGIN_FRACTION, 4)
    sigma: float = 1.0
    feature_stride: int = 4
    threshold: float = 0.5
    top_k: int = 3
    dice_weight: float = 0.2
    box_loss_weight: float = 1.0
    segmentation_loss_weight: float = 1.0
    fallback: str = "empty"
    canvas: list[int] | None = None
    locator_from_coarse: bool = True
    start_configuration: str | None = None

    def __post_init__(self) -> None:
        if self.fallback not in LSNET_FALLBACKS:
            raise ValueError(f"sts.{LSNET_KEY}.fallback must be one of {LSNET_FALLBACKS}, got {self.fallback!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.margin_fraction < 0.5 or self.sigma <= 0:
            raise ValueError(f"sts.{LSNET_KEY} needs 0 <= gamma <= 1, 0 <= margin_fraction < 0.5 and sigma > 0, got {self}")
        if not 0 < self.threshold < 1 or self.top_k < 1 or self.feature_stride < 1:
            raise ValueError(f"sts.{LSNET_KEY} needs 0 < threshold < 1, top_k >= 1 and feature_stride >= 1, got {self}")
        if min(self.dice_weight, self.box_loss_weight) < 0 or self.segmentation_loss_weight <= 0:
            raise ValueError(f"sts.{LSNET_KEY} needs non-negative loss weights (segmentation > 0), got {self}")
        self.canvas = checked_canvas(self.canvas, f"sts.{LSNET_KEY}")


@dataclass
class StSConfig:
    """Parameters of one segment-then-segment pipeline (stored in the fine configuration).

    - ``input_size``: S, the fine (and coarse) network input size per axis.
    - ``coarse_configuration`` / ``coarse_trainer``: where the coarse model is found, by
      convention ``nnUNet_results/<dataset>/<coarse_trainer>__<plans>__<coarse_configuration>``.
    - ``crop``: see :class:`nnunet_stseg.core.geometry.CropParams`.
    - ``fallback``: what a case with no usable coarse component gets: ``coarse`` (the coarse
      prediction, i.e. background) or ``whole`` (the fine network on the whole image/slices).
    - ``crops_per_batch``: crops per fine forward pass at inference (on the CPU also at most
      ``adapters.predictor.CPU_BATCH_VOXELS`` voxels of crops: bounded activations).
    - ``max_crops``: crops cut, resampled, segmented and fused at once; a case with more objects
      is processed in several such batches (a bound on memory; every object is segmented).
    - ``polar``: :class:`PolarParams` of a polar configuration (role ``polar``).
    - ``centre``: :class:`CentreParams` of the centre-point model (on a 2d coarse configuration).
    - ``objects_report``: write ``<case>.objects.json`` (what was found, in the input's voxel and
      world coordinates) next to each prediction (``STSEG_OVERRIDES=objects_report=0`` switches it off).
    - ``coarse_resampling`` (coarse configurations): how the images reach the coarse grid, the same
      function for its training data and at prediction (:data:`COARSE_RESAMPLINGS`); a block without
      the key (plans before 0.8) means ``nnunet``, so models trained then predict as they did.
    - ``e2e`` / ``lsnet``: :class:`E2EParams` / :class:`LSNetParams` of an end-to-end or L-SNet
      configuration (read from ``sts_e2e`` / ``sts_lsnet`` beside the block in plans before 0.9).
    - ``planning`` (fine configurations planned without ``-s``): what the planner chose from the
      object fingerprint and why, and which values were given (a record; nothing reads it back).
    """

    role: Literal["coarse", "fine", "polar", "e2e", "lsnet"]
    input_size: int
    coarse_configuration: str
    coarse_trainer: str = DEFAULT_COARSE_TRAINER
    crop: CropParams | None = None
    fallback: str = "coarse"
    crops_per_batch: int = 16
    max_crops: int = 64
    polar: PolarParams | None = None
    centre: CentreParams | None = None
    objects_report: bool = True
    coarse_resampling: str = "nnunet"
    e2e: E2EParams | None = None
    lsnet: LSNetParams | None = None
    planning: dict | None = None

    def to_dict(self) -> dict:
        d = {"role": self.role, "input_size": int(self.input_size),
             "coarse_configuration": self.coarse_configuration, "coarse_trainer": self.coarse_trainer,
             "fallback": self.fallback, "crops_per_batch": int(self.crops_per_batch),
             "max_crops": int(self.max_crops), "objects_report": bool(self.objects_report)}
        if self.crop is not None:
            d["crop"] = self.crop.to_dict()
        if self.polar is not None:
            d["polar"] = self.polar.to_dict()
        if self.centre is not None:
            d["centre"] = self.centre.to_dict()
        if self.role == "coarse":
            d["coarse_resampling"] = self.coarse_resampling
        for key in (E2E_KEY, LSNET_KEY):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key).to_dict()
        if self.planning is not None:
            d["planning"] = self.planning
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
        known = {f.name for f in fields(cls)} | {SIZES_KEY}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} in its '{STS_KEY}' block (a typo?); known: "
                             f"{sorted(known)}")
        crop = block.pop("crop", None)
        polar = block.pop("polar", None)
        centre = block.pop("centre", None)
        block.pop(SIZES_KEY, None)  # a size-trained configuration's block (SizeParams), not the cascade's
        if block.get("role") not in ROLES:
            raise ValueError(f"{where}: sts.role must be one of {ROLES}, got {block.get('role')!r}")
        methods = {key: params.from_configuration(configuration, where) if block_of(configuration, key) is not None
                   else None for key, params in ((E2E_KEY, E2EParams), (LSNET_KEY, LSNetParams))}
        block.update(methods)
        cfg = cls(crop=CropParams.from_dict(crop) if crop is not None else None,
                  polar=PolarParams.from_dict(polar) if polar is not None else None,
                  centre=CentreParams.from_dict(centre) if centre is not None else None, **block)
        if cfg.fallback not in FALLBACKS:
            raise ValueError(f"{where}: sts.fallback must be one of {FALLBACKS}, got {cfg.fallback!r}")
        if cfg.coarse_resampling not in COARSE_RESAMPLINGS:
            raise ValueError(f"{where}: sts.coarse_resampling must be one of {COARSE_RESAMPLINGS}, got "
                             f"{cfg.coarse_resampling!r}")
        if int(cfg.max_crops) < 1 or int(cfg.crops_per_batch) < 1:
            raise ValueError(f"{where}: sts.max_crops and sts.crops_per_batch must be >= 1")
        if cfg.role in ("fine", "e2e", "lsnet") and cfg.crop is None:
            raise ValueError(f"{where}: {cfg.role} configuration without sts.crop parameters")
        if cfg.role == "polar" and cfg.polar is None:
            raise ValueError(f"{where}: polar configuration without sts.polar parameters")
        return cfg

    @classmethod
    def for_role(cls, configuration: dict, roles: str | Sequence[str], where: str, user: str) -> "StSConfig":
        """The block of a configuration that must have one of ``roles``: the one check every
        trainer, predictor and command of ours makes before it uses a configuration. ``user`` says
        who needs it, for the error (which also says how the configuration at hand is trained).

        >>> fine = {"sts": StSConfig("fine", 64, "2d_sts_coarse_64", crop=CropParams((1, 64, 64))).to_dict()}
        >>> StSConfig.for_role(fine, ("fine", "polar"), "configuration '2d_sts_fine_64'", "bundle").role
        'fine'
        >>> StSConfig.for_role(fine, "e2e", "configuration '2d_sts_fine_64'", "the end-to-end model")
        Traceback (most recent call last):
        ...
        ValueError: configuration '2d_sts_fine_64' is the fine configuration (trained with nnUNetTrainer_StSFine); ...
        """
        sts = cls.from_configuration(configuration, where)
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        if sts.role not in roles:
            wanted = " or ".join(f"{'an' if r[0] in 'aeiou' else 'a'} {r} configuration"
                                 + (f" (`nnunet-stseg plan {PLAN_SWITCHES[r]}` adds it)" if r in PLAN_SWITCHES else "")
                                 for r in roles)
            raise ValueError(f"{where} is the {sts.role} configuration (trained with {trainer_for_role(sts)}); "
                             f"{user} needs {wanted}")
        return sts


PLAN_SWITCHES = {"polar": "--polar", "e2e": "--e2e", "lsnet": "--lsnet"}  # the plan switch that adds a role


def trainer_for_role(sts: StSConfig | dict) -> str:
    """The trainer that trains (and whose name predicts) a configuration of ours, from its ``sts``
    block: ``coarse`` -> the block's ``coarse_trainer``; ``fine`` / ``polar`` / ``e2e`` / ``lsnet`` -> ours."""
    block = sts.to_dict() if isinstance(sts, StSConfig) else sts
    trainers = {"coarse": block["coarse_trainer"], "fine": DEFAULT_FINE_TRAINER, "polar": DEFAULT_POLAR_TRAINER,
                "e2e": DEFAULT_E2E_TRAINER, "lsnet": DEFAULT_LSNET_TRAINER}
    return trainers[block["role"]]


BLOCKS = {"crop": CropParams, "polar": PolarParams, "centre": CentreParams, E2E_KEY: E2EParams,
          LSNET_KEY: LSNetParams, SIZES_KEY: SizeParams}
"""The blocks of ``sts`` and their dataclasses: ``sts.<block>.<key>``."""
TOP_LEVEL_KEYS = ("fallback", "crops_per_batch", "max_crops", "objects_report", "coarse_resampling")
"""The keys of ``sts`` itself that ``plan --set`` takes (the rest: role, S and the coarse companion,
are the plan's structure)."""
FIXED_BY_TRAINING = ("crop.patch_size", "polar.polar_shape", "coarse_resampling", "centre.sigma")
"""Keys the networks were trained with: ``plan --set`` may choose them (except the shapes, which
come from S), a per-run override may not."""
BUILT_IN_BLOCKS = ("e2e", "lsnet", "sizes")
"""Blocks no per-run override reaches: the end-to-end and L-SNet networks are built with their
block's values (box rule, margins, RoI sizes), and ``sizes`` is about training only."""
PLANNED_KEYS = ("crop.patch_size", "polar.polar_shape", "centre.median_object_radius", "centre.objects_measured")
"""Keys the planner works out itself; no ``--set`` for them."""


def settable_keys(per_run: bool = False) -> list[str]:
    """Every ``block.key`` that ``nnunet-stseg plan --set`` takes (``per_run``: those that
    ``STSEG_OVERRIDES`` takes, i.e. without the keys the networks were trained with).

    >>> "crop.margin_fraction" in settable_keys() and "polar.max_origins" in settable_keys(per_run=True)
    True
    >>> "crop.patch_size" in settable_keys(), "coarse_resampling" in settable_keys(per_run=True)
    (False, False)
    """
    keys = [*TOP_LEVEL_KEYS, *(f"{b}.{f.name}" for b, cls in BLOCKS.items() for f in fields(cls))]
    return sorted(k for k in keys if k not in PLANNED_KEYS and not (per_run and _fixed_by_training(k)))


def _fixed_by_training(key: str) -> bool:
    return key in FIXED_BY_TRAINING or key.partition(".")[0] in BUILT_IN_BLOCKS


def parse_value(raw: str):
    """A ``key=value`` value as Python: JSON (numbers, true/false, null, lists), ``none`` = null,
    anything else the string itself.

    >>> parse_value("0.1"), parse_value("none"), parse_value("heatmap"), parse_value("[128, 128]")
    (0.1, None, 'heatmap', [128, 128])
    """
    import json

    raw = raw.strip()
    if raw.lower() == "none":
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _coerced(key: str, value, where: str):
    """``value`` as the type of the dataclass field ``key`` (``block.key`` or a top-level key): 0/1
    for a switch, a whole number for a float; a value of the wrong kind is an error naming ``where``."""
    import typing

    block, _, name = key.rpartition(".")
    hint = typing.get_type_hints(BLOCKS[block] if block else StSConfig)[name]
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    kind = kinds[0] if kinds else object
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
    elif kind is bool:
        if value in (0, 1) or isinstance(value, bool):
            return bool(value)
    elif kind in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or value == int(value)):
            return kind(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:  # lists, tuples, literals: the dataclass checks them
        return value
    raise ValueError(f"{where}: {key}={value!r} is not {getattr(kind, '__name__', kind)}")


def parse_assignments(items, where: str, per_run: bool = False) -> dict[str, object]:
    """``block.key=value`` items (``plan --set``, ``STSEG_OVERRIDES``) as ``{block.key: value}``,
    checked by :func:`checked_values`.

    >>> parse_assignments(["polar.max_origins=1", "crop.proposal_threshold=0.1"], "--set")
    {'polar.max_origins': 1, 'crop.proposal_threshold': 0.1}
    >>> parse_assignments(["crop.margin=0.2"], "--set")
    Traceback (most recent call last):
    ...
    ValueError: --set: unknown key 'crop.margin'; valid keys: crop.jitter_box_fraction, ..., crop.square
    """
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}: {item!r} is not block.key=value (e.g. crop.margin_fraction=0.2)")
        values[key.strip()] = raw
    return checked_values(values, where, per_run)


def checked_values(values: dict[str, object], where: str, per_run: bool = False) -> dict[str, object]:
    """``{block.key: value}`` with every key checked against the dataclasses (an unknown key lists
    the valid ones; a leading ``sts.`` is allowed) and every value converted to its field's type;
    the dataclasses check the values' ranges when they are applied. A string value is read by
    :func:`parse_value` first. ``per_run``: the keys a prediction may change (:func:`settable_keys`)."""
    valid = settable_keys(per_run)
    out: dict[str, object] = {}
    for key, value in values.items():
        key = key.removeprefix(f"{STS_KEY}.")
        if key not in valid:
            fixed = " (the networks were trained with it: plan it with --set and retrain)" \
                if per_run and _fixed_by_training(key) else ""
            block = key.rpartition(".")[0]
            same_block = [k for k in valid if k.startswith(f"{block}.")] if block in BLOCKS else []
            listed = same_block or [k for k in valid if "." not in k] + [f"{b}.*" for b in BLOCKS]
            raise ValueError(f"{where}: unknown key {key!r}{fixed}; valid keys: {', '.join(listed)}")
        out[key] = _coerced(key, parse_value(value) if isinstance(value, str) else value, where)
    return out


def apply_plan_overrides(sts: StSConfig, centre: CentreParams | None, overrides: dict[str, object]
                         ) -> tuple[StSConfig, CentreParams | None, dict[str, dict]]:
    """Plan values replaced for one run by ``overrides`` (``{block.key: value}``, as
    :func:`nnunet_stseg.settings.plan_overrides` returns them: checked with
    :func:`parse_assignments`); keys of a block this model does not have (a polar key for a
    cascade) are ignored. Returns the new ``sts`` and ``centre`` and what changed,
    ``{sts.block.key: {"plans": old, "used": new}}``, for the log and the record next to the outputs.

    >>> sts = StSConfig("polar", 64, "2d_sts_coarse_64", polar=PolarParams((64, 64)))
    >>> new, _, changed = apply_plan_overrides(sts, None, {"polar.max_origins": 1})
    >>> new.polar.max_origins, changed
    (1, {'sts.polar.max_origins': {'plans': 32, 'used': 1}})
    """
    overrides = checked_values(overrides, "plan overrides", per_run=True)
    changed: dict[str, dict] = {}
    values = {"": sts, "centre": centre}
    for key, value in overrides.items():
        block, _, name = key.rpartition(".")
        target = values.get(block) if block in ("", "centre") else getattr(values[""], block, None)
        if target is None or getattr(target, name) == value:
            continue
        changed[f"{STS_KEY}.{key}"] = {"plans": getattr(target, name), "used": value}
        target = replace(target, **{name: value})
        if block in ("", "centre"):
            values[block] = target
        else:
            values[""] = replace(values[""], **{block: target})
    return values[""], values["centre"], changed


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What ``nnunet-stseg plan`` decides about a dataset's plans, passed by keyword from the
    command line to the planner (one typed object instead of positional arguments).

    - ``input_size``: S (None: S, the coarse grid, the size rule and ``max_crops`` are chosen from
      the training labels' objects, :mod:`nnunet_stseg.core.autoplan`); ``dims``: pipelines to add (``2d``, ``3d``; default: every one the
      dataset has); ``base_features`` / ``max_features`` / ``batch_size``: network width and batch
      (None = nnU-Net's plan); ``coarse_trainer``: recorded in the ``sts`` blocks;
    - ``crop``: :class:`CropParams` fields to set (e.g. ``{"margin_fraction": 0.2}``);
      ``fallback``: see :class:`StSConfig`; ``depth_channel``: 2d pipelines get the depth channel;
    - ``polar``: add the 2d polar configuration; ``polar_params``: :class:`PolarParams` fields;
      ``centre_loss``: :class:`CentreParams` ``loss`` of the centre-point model.
    - ``coarse_resampling``: :class:`StSConfig` ``coarse_resampling`` of the coarse configurations.
    - ``e2e``: add the 2d end-to-end configuration; ``e2e_params``: :class:`E2EParams` fields.
    - ``lsnet``: add the 2d L-SNet configuration; ``lsnet_params``: :class:`LSNetParams` fields.
    - ``sts_params``: :class:`StSConfig` fields of the fine and polar blocks (``crops_per_batch``,
      ``max_crops``, ``objects_report``); ``centre_params``: :class:`CentreParams` fields.

    ``plan --set block.key=value`` fills these through :func:`plan_option_values`.

    >>> PlanOptions(input_size=32, crop={"margin_fraction": 0.2}).crop
    {'margin_fraction': 0.2}
    >>> PlanOptions(input_size=32, crop={"max_crop": 3})
    Traceback (most recent call last):
    ...
    ValueError: unknown crop parameters ['max_crop']; known: ['jitter_box_fraction', ...]
    """

    input_size: int | None = None
    dims: tuple[str, ...] | None = None
    base_features: int | None = None
    max_features: int | None = None
    batch_size: int | None = None
    coarse_trainer: str = DEFAULT_COARSE_TRAINER
    crop: dict = field(default_factory=dict)
    fallback: str = "coarse"
    depth_channel: bool = False
    polar: bool = False
    polar_params: dict = field(default_factory=dict)
    centre_loss: str = "focal"
    coarse_resampling: str = DEFAULT_COARSE_RESAMPLING
    e2e: bool = False
    e2e_params: dict = field(default_factory=dict)
    lsnet: bool = False
    lsnet_params: dict = field(default_factory=dict)
    sts_params: dict = field(default_factory=dict)
    centre_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_size is not None and int(self.input_size) < 8:
            raise ValueError(f"input size S must be >= 8, got {self.input_size}")
        if self.dims is not None:
            object.__setattr__(self, "dims", tuple(self.dims))
            bad = [d for d in self.dims if d not in ("2d", "3d")]
            if bad:
                raise ValueError(f"unknown dimensionality {bad[0]!r}; use 2d and/or 3d")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        checked_fields(CropParams, self.crop, "crop")
        # the values too, before any planning work (the planner sets the patch size)
        CropParams(**{"patch_size": (1, 8, 8), **{k: v for k, v in self.crop.items() if k != "patch_size"}})
        checked_fields(PolarParams, self.polar_params, "polar")
        if self.centre_loss not in CENTRE_LOSSES:
            raise ValueError(f"centre_loss must be one of {CENTRE_LOSSES}, got {self.centre_loss!r}")
        if self.coarse_resampling not in COARSE_RESAMPLINGS:
            raise ValueError(f"coarse_resampling must be one of {COARSE_RESAMPLINGS}, got {self.coarse_resampling!r}")
        E2EParams(**checked_fields(E2EParams, self.e2e_params, E2E_KEY))
        LSNetParams(**checked_fields(LSNetParams, self.lsnet_params, LSNET_KEY))
        checked_fields(CentreParams, self.centre_params, "centre")
        CentreParams(**{"sigma": 1.0, **self.centre_params})
        unknown = sorted(set(self.sts_params) - {"crops_per_batch", "max_crops", "objects_report"})
        if unknown:
            raise ValueError(f"unknown sts parameters {unknown}; known: ['crops_per_batch', 'max_crops', "
                             f"'objects_report']")
        if any(int(self.sts_params.get(k, 1)) < 1 for k in ("crops_per_batch", "max_crops")):
            raise ValueError(f"crops_per_batch and max_crops must be >= 1, got {self.sts_params}")
        for name in ("base_features", "max_features", "batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def plan_option_values(values: dict[str, object]) -> dict[str, object]:
    """``plan --set`` values (``{block.key: value}``, checked by :func:`checked_values`) as
    :class:`PlanOptions` keyword arguments. The cascade and the polar stage share one size rule:
    ``crop.min_object_size`` / ``crop.size_rule_grid`` set the polar stage's too unless ``polar.*``
    gives its own.

    >>> plan_option_values({"crop.min_object_size": 3.0, "max_crops": 8})
    {'crop': {'min_object_size': 3.0}, 'polar_params': {'min_object_size': 3.0}, 'sts_params': {'max_crops': 8}}
    """
    kwargs: dict[str, object] = {}
    names = {"crop": "crop", "polar": "polar_params", "centre": "centre_params", E2E_KEY: "e2e_params",
             LSNET_KEY: "lsnet_params", "": "sts_params"}
    values = checked_values(values, "--set")
    for key, value in values.items():
        block, _, name = key.rpartition(".")
        if block == SIZES_KEY:
            raise ValueError(f"--set {key}: the size-trained configuration is set with `nnunet-stseg sizes configure`")
        if key in ("fallback", "coarse_resampling", "centre.loss"):
            kwargs[{"centre.loss": "centre_loss"}.get(key, key)] = value
            continue
        kwargs.setdefault(names[block], {})[name] = value
        if block == "crop" and name in ("min_object_size", "size_rule_grid") and f"polar.{name}" not in values:
            kwargs.setdefault("polar_params", {})[name] = value
    return kwargs


def plan_dims(options: PlanOptions, available: Sequence[str]) -> list[str]:
    """The dimensionalities to plan: ``options.dims`` or every available one."""
    return list(options.dims) if options.dims else list(available)
