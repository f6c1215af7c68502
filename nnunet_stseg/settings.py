"""Every environment variable nnunet-stseg reads, in one place, with typed accessors.

In the spirit of MONAI's ``MONAIEnvVars``: one table (:data:`SETTINGS`) says what each variable
means and which values it takes; one accessor per variable returns the typed value or None when
unset or empty; anything else is a ``ValueError`` in one style,
``environment variable NAME='raw': expected WHAT``. No other module reads ``STSEG_*`` variables.

Two kinds:

- **schedule** variables change how our trainers run (CPU-sized schedules, validation); the
  trainer writes the values it used into its training log;
- **plan overrides** replace values stored in the plans for one prediction: one variable,
  ``STSEG_OVERRIDES="polar.max_origins=1,crop.proposal_threshold=0.1"`` (the keys of ``nnunet-stseg
  plan --set`` that do not change the networks); the predictor checks them against the plans'
  dataclasses, applies them once, logs them, and writes them next to the predictions
  (``nnunet_stseg_overrides.json``) so the run can be reproduced. The single-value variables of
  0.8 (``STSEG_POLAR_ORIGINS``, ...) still work in 0.9, with a deprecation warning.

>>> import os
>>> os.environ["STSEG_NUM_EPOCHS"] = "3"
>>> num_epochs()
3
>>> os.environ["STSEG_NUM_EPOCHS"] = "three"
>>> num_epochs()
Traceback (most recent call last):
...
ValueError: environment variable STSEG_NUM_EPOCHS='three': expected a whole number >= 1
>>> del os.environ["STSEG_NUM_EPOCHS"]
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

OVERRIDES_FILE = "nnunet_stseg_overrides.json"
# the plan overrides of the polar stage, by name (experiments set them for child processes)
ORIGIN_SOURCE_ENV = "STSEG_POLAR_ORIGINS"
MAX_ORIGINS_ENV = "STSEG_POLAR_MAX_ORIGINS"
PEAK_THRESHOLD_ENV = "STSEG_POLAR_PEAK_THRESHOLD"
MIN_CONFIDENCE_ENV = "STSEG_POLAR_MIN_CONFIDENCE"
CONFIDENCE_WEIGHTING_ENV = "STSEG_POLAR_CONFIDENCE_WEIGHTING"
IN_PROCESS_ENV = "STSEG_PREDICT_IN_PROCESS"
OVERRIDES_ENV = "STSEG_OVERRIDES"
IN_PROCESS_LOG = "case(s) in this process"  # in the predictor's log line when it predicts without workers


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, the values it takes, what it does, and (for plan
    overrides) the plan key it replaces."""

    name: str
    expected: str
    meaning: str
    plan_key: str | None = None
    deprecated: bool = False  # a single-value plan override of 0.8: STSEG_OVERRIDES replaces it


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("STSEG_NUM_EPOCHS", "a whole number >= 1", "epochs of our trainers (nnU-Net: 1000)"),
    Setting("STSEG_ITERS_PER_EPOCH", "a whole number >= 1", "training iterations per epoch (nnU-Net: 250)"),
    Setting("STSEG_VAL_ITERS", "a whole number >= 1", "validation iterations per epoch (nnU-Net: 50)"),
    Setting("STSEG_SAVE_EVERY", "a whole number >= 1", "epochs between checkpoint_latest.pth saves (nnU-Net: 50)"),
    Setting("STSEG_PATIENCE", "a whole number >= 1",
            "stop training when the validation loss (the size trainer's size phase: the validation size error) has "
            "not improved for this many epochs; checkpoint_best.pth is then the best epoch by it"),
    Setting("STSEG_SKIP_VALIDATION", "0 or 1", "1: skip the final validation after training"),
    Setting("STSEG_VAL_MIRRORING", "0 or 1", "0: final validation without test-time mirroring"),
    Setting("STSEG_POLAR_ORIGINS", "coarse or heatmap", "origin source of the polar stage at prediction",
            "sts.polar.origin_source", deprecated=True),
    Setting("STSEG_POLAR_MAX_ORIGINS", "a whole number >= 1", "polar origins per slice at prediction",
            "sts.polar.max_origins", deprecated=True),
    Setting("STSEG_POLAR_PEAK_THRESHOLD", "a number in [0, 1) (0 = no threshold)",
            "heatmap value from which a peak is a polar origin", "sts.centre.peak_threshold", deprecated=True),
    Setting(MIN_CONFIDENCE_ENV, "a number in [0, 1) (0 = keep every origin)",
            "confidence an origin needs to be used by the polar stage", "sts.polar.min_origin_confidence",
            deprecated=True),
    Setting(CONFIDENCE_WEIGHTING_ENV, "0 or 1", "1: polar views weighted by their origin's confidence in the fusion",
            "sts.polar.confidence_weighting", deprecated=True),
    Setting("STSEG_OBJECTS_REPORT", "0 or 1", "0: no <case>.objects.json next to the predictions",
            "sts.objects_report", deprecated=True),
    Setting("STSEG_PROPOSAL_THRESHOLD", "a number in (0, 0.5], or none (coarse argmax components only)",
            "coarse foreground probability from which a region is a cascade proposal", "sts.crop.proposal_threshold",
            deprecated=True),
    Setting("STSEG_PROPOSAL_CONFIRMATION", "a number in [0.5, 1), or none (every proposal fused)",
            "fine-stage mean foreground probability a cascade proposal below the coarse decision needs to be fused",
            "sts.crop.proposal_confirmation", deprecated=True),
    Setting(OVERRIDES_ENV,
            "comma-separated block.key=value pairs, e.g. polar.max_origins=1,crop.proposal_threshold=0.1",
            "plan values replaced for one prediction (any key of `nnunet-stseg plan --set` that does not change the "
            "networks)", "sts.*"),
    Setting(IN_PROCESS_ENV, "auto, 0 or 1",
            "1: nnUNetv2_predict predicts our models in its own process (as -npp 0 -nps 0 asks, -num_parts kept); "
            "0: always nnU-Net's worker processes as -npp/-nps ask; auto (unset): in its own process for the cascade "
            "family on the CPU device of a machine with at most 2 usable cores"),
    Setting("STSEG_LOG_LEVEL", "debug or info",
            "debug: one line per predicted case with the seconds of every stage (also with "
            "nnUNetv2_predict --verbose)"),
)}
PROPOSAL_THRESHOLD_ENV = "STSEG_PROPOSAL_THRESHOLD"
PROPOSAL_CONFIRMATION_ENV = "STSEG_PROPOSAL_CONFIRMATION"


def _read(name: str, parse: Callable[[str], object], valid: Callable[[object], bool]):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"environment variable {name}={raw!r}: expected {SETTINGS[name].expected}")
    return value


def _positive_int(name: str) -> int | None:
    return _read(name, int, lambda v: v >= 1)


def _switch(name: str) -> bool | None:
    return _read(name, lambda raw: {"0": False, "1": True}[raw] if raw in ("0", "1") else None, lambda v: True)


def num_epochs() -> int | None:
    return _positive_int("STSEG_NUM_EPOCHS")


def iters_per_epoch() -> int | None:
    return _positive_int("STSEG_ITERS_PER_EPOCH")


def val_iters() -> int | None:
    return _positive_int("STSEG_VAL_ITERS")


def save_every() -> int | None:
    return _positive_int("STSEG_SAVE_EVERY")


def patience() -> int | None:
    return _positive_int("STSEG_PATIENCE")


def skip_validation() -> bool:
    return bool(_switch("STSEG_SKIP_VALIDATION"))


def validation_mirroring() -> bool:
    """False only when ``STSEG_VAL_MIRRORING=0``."""
    return _switch("STSEG_VAL_MIRRORING") is not False


def polar_origin_source() -> str | None:
    return _read("STSEG_POLAR_ORIGINS", str, lambda v: v in ("coarse", "heatmap"))


def polar_max_origins() -> int | None:
    return _positive_int("STSEG_POLAR_MAX_ORIGINS")


def polar_peak_threshold() -> float | None:
    """The override of ``sts.centre.peak_threshold``; 0 means "no threshold"."""
    return _read("STSEG_POLAR_PEAK_THRESHOLD", float, lambda v: 0 <= v < 1)


def polar_min_confidence() -> float | None:
    """The override of ``sts.polar.min_origin_confidence``."""
    return _read(MIN_CONFIDENCE_ENV, float, lambda v: 0 <= v < 1)


def polar_confidence_weighting() -> bool | None:
    """The override of ``sts.polar.confidence_weighting``."""
    return _switch(CONFIDENCE_WEIGHTING_ENV)


def objects_report() -> bool | None:
    """The override of ``sts.objects_report`` (``<case>.objects.json`` next to the predictions)."""
    return _switch("STSEG_OBJECTS_REPORT")


def proposal_threshold() -> float | str | None:
    """The override of ``sts.crop.proposal_threshold``: a number, ``"none"`` (the argmax
    components only, the published method) or None (not set)."""
    return _read(PROPOSAL_THRESHOLD_ENV, lambda raw: "none" if raw.lower() == "none" else float(raw),
                 lambda v: v == "none" or 0 < v <= 0.5)


def proposal_confirmation() -> float | str | None:
    """The override of ``sts.crop.proposal_confirmation``: a number, ``"none"`` (every proposal
    fused) or None (not set)."""
    return _read(PROPOSAL_CONFIRMATION_ENV, lambda raw: "none" if raw.lower() == "none" else float(raw),
                 lambda v: v == "none" or 0.5 <= v < 1)


def debug_log() -> bool:
    """True when ``STSEG_LOG_LEVEL=debug``: the predictors log each case's stage timings."""
    return _read("STSEG_LOG_LEVEL", str.lower, lambda v: v in ("debug", "info")) == "debug"


def predict_in_process() -> bool | None:
    """``STSEG_PREDICT_IN_PROCESS``: True (1), False (0) or None (unset or ``auto``: the predictor
    decides from the device and the cores, :func:`nnunet_stseg.adapters.predictor.in_process_rule`)."""
    value = _read(IN_PROCESS_ENV, lambda raw: {"0": False, "1": True, "auto": "auto"}.get(raw.lower()), lambda v: True)
    return None if value == "auto" else value


def plan_overrides() -> dict[str, object]:
    """The plan values replaced for this process, ``{sts.block.key: value}``: the pairs of
    ``STSEG_OVERRIDES`` (values as typed; the predictor checks keys and values against the plans'
    dataclasses before any work) and the deprecated single-value variables (checked here; each set
    one warns once; ``STSEG_OVERRIDES`` wins over them).

    >>> import os
    >>> os.environ["STSEG_OVERRIDES"] = "polar.max_origins=1, crop.proposal_threshold=none"
    >>> plan_overrides()
    {'sts.polar.max_origins': '1', 'sts.crop.proposal_threshold': 'none'}
    >>> del os.environ["STSEG_OVERRIDES"]
    """
    legacy = {"STSEG_POLAR_ORIGINS": polar_origin_source, "STSEG_POLAR_MAX_ORIGINS": polar_max_origins,
              "STSEG_POLAR_PEAK_THRESHOLD": polar_peak_threshold, "STSEG_OBJECTS_REPORT": objects_report,
              MIN_CONFIDENCE_ENV: polar_min_confidence, CONFIDENCE_WEIGHTING_ENV: polar_confidence_weighting,
              PROPOSAL_THRESHOLD_ENV: proposal_threshold, PROPOSAL_CONFIRMATION_ENV: proposal_confirmation}
    values: dict[str, object] = {}
    for name, read in legacy.items():
        value = read()
        if value is not None:
            key = SETTINGS[name].plan_key
            warnings.warn(f"{name} is deprecated and will be removed in 0.10; use "
                          f"{OVERRIDES_ENV}={key.removeprefix('sts.')}={os.environ[name].strip()}", FutureWarning,
                          stacklevel=2)
            values[key] = value
    values.update(overrides_variable() or {})
    return values


def overrides_variable() -> dict[str, str] | None:
    """``STSEG_OVERRIDES`` as ``{sts.block.key: raw value}`` (pairs split at the commas outside
    brackets, so a list value keeps its commas), None when unset; a malformed pair is an error."""
    raw = os.environ.get(OVERRIDES_ENV, "").strip()
    if not raw:
        return None
    pairs = {}
    for item in re.split(r",(?![^\[]*\])", raw):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key.strip()):
            raise ValueError(f"environment variable {OVERRIDES_ENV}={raw!r}: expected "
                             f"{SETTINGS[OVERRIDES_ENV].expected}")
        pairs[f"sts.{key.strip().removeprefix('sts.')}"] = value.strip()
    return pairs


def overrides_env(values: dict[str, object]) -> dict[str, str]:
    """The environment that gives a child process these plan overrides (``{block.key: value}``),
    with every deprecated single-value variable cleared so that the caller's own do not leak in.

    >>> overrides_env({"polar.origin_source": "heatmap", "polar.max_origins": 1})["STSEG_OVERRIDES"]
    'polar.origin_source=heatmap,polar.max_origins=1'
    """
    return {**{name: "" for name, s in SETTINGS.items() if s.deprecated},
            OVERRIDES_ENV: ",".join(f"{k}={v}" for k, v in values.items() if v is not None)}


def schedule_settings() -> dict[str, object]:
    """The schedule variables that are set, ``{name: value}`` (checked), for training logs."""
    values = {"STSEG_NUM_EPOCHS": num_epochs(), "STSEG_ITERS_PER_EPOCH": iters_per_epoch(),
              "STSEG_VAL_ITERS": val_iters(), "STSEG_SAVE_EVERY": save_every(), "STSEG_PATIENCE": patience(),
              "STSEG_SKIP_VALIDATION": _switch("STSEG_SKIP_VALIDATION"),
              "STSEG_VAL_MIRRORING": _switch("STSEG_VAL_MIRRORING")}
    return {k: v for k, v in values.items() if v is not None}


__all__ = ["SETTINGS", "Setting", "OVERRIDES_FILE", "ORIGIN_SOURCE_ENV", "MAX_ORIGINS_ENV", "PEAK_THRESHOLD_ENV",
           "MIN_CONFIDENCE_ENV", "CONFIDENCE_WEIGHTING_ENV", "polar_min_confidence", "polar_confidence_weighting",
           "PROPOSAL_THRESHOLD_ENV", "proposal_threshold", "PROPOSAL_CONFIRMATION_ENV", "proposal_confirmation",
           "num_epochs", "iters_per_epoch", "val_iters", "save_every", "patience", "skip_validation", "validation_mirroring",
           "polar_origin_source", "polar_max_origins", "polar_peak_threshold", "objects_report", "plan_overrides",
           "schedule_settings", "debug_log", "IN_PROCESS_ENV", "IN_PROCESS_LOG",
           "predict_in_process", "OVERRIDES_ENV", "overrides_variable", "overrides_env"]
