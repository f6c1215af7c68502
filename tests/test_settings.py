"""One home for settings: every environment variable is read through nnunet_stseg.settings, has one
error style, is documented, and plan overrides are applied once and recorded."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnunet_stseg import settings
from nnunet_stseg.adapters.config import CentreParams, PolarParams, StSConfig, apply_plan_overrides
from nnunet_stseg.core.geometry import CropParams

ROOT = Path(__file__).resolve().parents[1]
ACCESSORS = {"STSEG_NUM_EPOCHS": settings.num_epochs, "STSEG_ITERS_PER_EPOCH": settings.iters_per_epoch,
             "STSEG_VAL_ITERS": settings.val_iters, "STSEG_SAVE_EVERY": settings.save_every,
             "STSEG_PATIENCE": settings.patience, "STSEG_SKIP_VALIDATION": settings.skip_validation, "STSEG_VAL_MIRRORING": settings.validation_mirroring,
             "STSEG_POLAR_ORIGINS": settings.polar_origin_source, "STSEG_POLAR_MAX_ORIGINS": settings.polar_max_origins,
             "STSEG_POLAR_PEAK_THRESHOLD": settings.polar_peak_threshold, "STSEG_OBJECTS_REPORT": settings.objects_report,
             "STSEG_PROPOSAL_THRESHOLD": settings.proposal_threshold,
             "STSEG_PROPOSAL_CONFIRMATION": settings.proposal_confirmation,
             "STSEG_POLAR_MIN_CONFIDENCE": settings.polar_min_confidence,
             "STSEG_POLAR_CONFIDENCE_WEIGHTING": settings.polar_confidence_weighting,
             "STSEG_LOG_LEVEL": settings.debug_log, "STSEG_PREDICT_IN_PROCESS": settings.predict_in_process,
             "STSEG_OVERRIDES": settings.overrides_variable}
GOOD = {"STSEG_NUM_EPOCHS": ("3", 3), "STSEG_ITERS_PER_EPOCH": ("12", 12), "STSEG_VAL_ITERS": ("1", 1),
        "STSEG_SAVE_EVERY": ("5", 5), "STSEG_PATIENCE": ("10", 10), "STSEG_SKIP_VALIDATION": ("1", True), "STSEG_VAL_MIRRORING": ("0", False),
        "STSEG_POLAR_ORIGINS": ("heatmap", "heatmap"), "STSEG_POLAR_MAX_ORIGINS": ("1", 1),
        "STSEG_POLAR_PEAK_THRESHOLD": ("0", 0.0), "STSEG_OBJECTS_REPORT": ("0", False),
        "STSEG_PROPOSAL_THRESHOLD": ("0.2", 0.2), "STSEG_PROPOSAL_CONFIRMATION": ("0.5", 0.5),
        "STSEG_POLAR_MIN_CONFIDENCE": ("0.7", 0.7),
        "STSEG_POLAR_CONFIDENCE_WEIGHTING": ("1", True), "STSEG_LOG_LEVEL": ("DEBUG", True),
        "STSEG_PREDICT_IN_PROCESS": ("0", False),
        "STSEG_OVERRIDES": ("polar.max_origins=1, e2e.canvas=[64, 64],sts.crop.proposal_threshold=none",
                            {"sts.polar.max_origins": "1", "sts.e2e.canvas": "[64, 64]",
                             "sts.crop.proposal_threshold": "none"})}
BAD = {"STSEG_NUM_EPOCHS": ["0", "-3", "abc", "1.5"], "STSEG_ITERS_PER_EPOCH": ["0"], "STSEG_VAL_ITERS": ["x"],
       "STSEG_SAVE_EVERY": ["-1"], "STSEG_PATIENCE": ["0", "ten"], "STSEG_SKIP_VALIDATION": ["yes", "2"], "STSEG_VAL_MIRRORING": ["no"],
       "STSEG_POLAR_ORIGINS": ["magic", "Coarse"], "STSEG_POLAR_MAX_ORIGINS": ["0", "two"],
       "STSEG_POLAR_PEAK_THRESHOLD": ["1", "-0.1", "half"], "STSEG_OBJECTS_REPORT": ["off"],
       "STSEG_PROPOSAL_THRESHOLD": ["0", "0.6", "low"], "STSEG_PROPOSAL_CONFIRMATION": ["0.49", "1", "sure"],
       "STSEG_POLAR_MIN_CONFIDENCE": ["1", "-0.5", "high"],
       "STSEG_POLAR_CONFIDENCE_WEIGHTING": ["yes"], "STSEG_LOG_LEVEL": ["verbose", "2"],
       "STSEG_PREDICT_IN_PROCESS": ["yes", "2", "workers"],
       "STSEG_OVERRIDES": ["polar.max_origins", "=1", "polar max=1", "polar.max_origins=1,crop.square"]}


def test_the_table_and_the_accessors_cover_the_same_variables():
    assert set(ACCESSORS) == set(settings.SETTINGS) == set(GOOD) == set(BAD)


@pytest.mark.parametrize("name", sorted(settings.SETTINGS))
def test_every_setting_unset_valid_and_invalid(monkeypatch, name):
    read = ACCESSORS[name]
    monkeypatch.delenv(name, raising=False)
    unset = read()
    monkeypatch.setenv(name, "  ")
    assert read() == unset, "empty means unset"
    assert unset in (None, False, True)
    raw, value = GOOD[name]
    monkeypatch.setenv(name, raw)
    assert read() == value
    for bad in BAD[name]:
        monkeypatch.setenv(name, bad)
        expected = re.escape(f"environment variable {name}={bad!r}: expected {settings.SETTINGS[name].expected}")
        with pytest.raises(ValueError, match=expected):
            read()


def test_in_process_auto_means_the_predictor_decides(monkeypatch):
    for raw, value in (("1", True), ("AUTO", None), ("auto", None), ("0", False)):
        monkeypatch.setenv("STSEG_PREDICT_IN_PROCESS", raw)
        assert settings.predict_in_process() is value


def test_no_module_reads_stseg_variables_but_settings():
    """Every STSEG_* variable of the package is read in nnunet_stseg/settings.py only."""
    offenders = []
    for path in [*ROOT.joinpath("nnunet_stseg").rglob("*.py"), *ROOT.joinpath("trainers").rglob("*.py"),
                 *ROOT.joinpath("planners").rglob("*.py")]:
        if path.name == "settings.py":
            continue
        text = path.read_text()
        if re.search(r"os\.environ(\.get)?\s*[\[(]\s*[\"']STSEG_|getenv\(\s*[\"']STSEG_", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_setting_is_documented_in_the_readme():
    readme = ROOT.joinpath("README.md").read_text()
    assert [name for name in settings.SETTINGS if f"`{name}" not in readme] == []


def test_plan_overrides_are_checked_and_keyed_by_plan_value(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert settings.plan_overrides() == {}
    monkeypatch.setenv("STSEG_POLAR_ORIGINS", "heatmap")
    monkeypatch.setenv("STSEG_POLAR_PEAK_THRESHOLD", "0.1")
    monkeypatch.setenv("STSEG_NUM_EPOCHS", "2")  # a schedule setting, not a plan override
    # the single-value variables of 0.8 still work, each with a warning that names its replacement
    with pytest.warns(FutureWarning) as warned:
        assert settings.plan_overrides() == {"sts.polar.origin_source": "heatmap", "sts.centre.peak_threshold": 0.1}
    assert sorted(str(w.message) for w in warned) == [
        "STSEG_POLAR_ORIGINS is deprecated and will be removed in 0.10; use "
        "STSEG_OVERRIDES=polar.origin_source=heatmap",
        "STSEG_POLAR_PEAK_THRESHOLD is deprecated and will be removed in 0.10; use "
        "STSEG_OVERRIDES=centre.peak_threshold=0.1"]
    assert settings.schedule_settings() == {"STSEG_NUM_EPOCHS": 2}
    # the one variable wins over them
    monkeypatch.setenv("STSEG_OVERRIDES", "polar.origin_source=coarse,polar.max_origins=2")
    with pytest.warns(FutureWarning):
        assert settings.plan_overrides() == {"sts.polar.origin_source": "coarse", "sts.centre.peak_threshold": 0.1,
                                             "sts.polar.max_origins": "2"}
    monkeypatch.setenv("STSEG_POLAR_MAX_ORIGINS", "many")
    with pytest.raises(ValueError, match="STSEG_POLAR_MAX_ORIGINS"), pytest.warns(FutureWarning):
        settings.plan_overrides()


def test_per_run_overrides_are_checked_against_the_plans_dataclasses():
    """STSEG_OVERRIDES takes the keys of `plan --set` that do not change the networks; an unknown
    key lists the valid ones, a trained-with key says why it is refused, a value out of range is
    refused by its dataclass."""
    cascade = StSConfig("fine", 32, "2d_sts_coarse_32", crop=CropParams(patch_size=(1, 32, 32)))
    new, _, changed = apply_plan_overrides(cascade, None, {"sts.max_crops": "8", "sts.crop.margin_min": "2"})
    assert (new.max_crops, new.crop.margin_min) == (8, 2.0)
    assert changed == {"sts.max_crops": {"plans": 64, "used": 8}, "sts.crop.margin_min": {"plans": 4.0, "used": 2.0}}
    with pytest.raises(ValueError, match=r"unknown key 'crop\.margin'; valid keys: crop\.jitter_box_fraction, "
                                         r".*crop\.margin_min"):
        apply_plan_overrides(cascade, None, {"sts.crop.margin": "2"})
    with pytest.raises(ValueError, match="unknown key 'crop.patch_size'"):
        apply_plan_overrides(cascade, None, {"sts.crop.patch_size": "[1, 64, 64]"})
    with pytest.raises(ValueError, match="coarse_resampling' \\(the networks were trained with it"):
        apply_plan_overrides(cascade, None, {"sts.coarse_resampling": "nnunet"})
    for key in ("sts.e2e.box_rule", "sts.lsnet.fallback"):  # held by the built network: refused, with why
        with pytest.raises(ValueError, match=f"{key[4:]}' \\(the networks were trained with it"):
            apply_plan_overrides(cascade, None, {key: "all"})
    with pytest.raises(ValueError, match="max_crops='many' is not int"):
        apply_plan_overrides(cascade, None, {"sts.max_crops": "many"})
    with pytest.raises(ValueError, match="proposal_threshold"):
        apply_plan_overrides(cascade, None, {"sts.crop.proposal_threshold": "0.9"})
    polar = StSConfig("polar", 32, "2d_sts_coarse_32", polar=PolarParams((32, 32)))
    with pytest.raises(ValueError, match="max_origins must be >= 1"):
        apply_plan_overrides(polar, None, {"sts.polar.max_origins": "0"})


def test_apply_plan_overrides_reports_only_what_changed():
    sts = StSConfig("polar", 32, "2d_sts_coarse_32", polar=PolarParams((32, 32)))
    centre = CentreParams(sigma=2.0)
    new, new_centre, changed = apply_plan_overrides(
        sts, centre, {"sts.polar.origin_source": "coarse", "sts.polar.max_origins": 1,
                      "sts.centre.peak_threshold": 0.0})
    assert (new.polar.origin_source, new.polar.max_origins, new_centre.peak_threshold) == ("coarse", 1, 0.0)
    assert changed == {"sts.polar.max_origins": {"plans": 32, "used": 1},
                       "sts.centre.peak_threshold": {"plans": 0.5, "used": 0.0}}
    assert sts.polar.max_origins == 32 and centre.peak_threshold == 0.5, "the inputs are not modified"
    cascade = StSConfig("fine", 32, "2d_sts_coarse_32")
    assert apply_plan_overrides(cascade, None, {"sts.polar.max_origins": 1}) == (cascade, None, {})
    # the cascade's proposal threshold: 'none' switches recall-first proposals off, a number replaces it
    cascade = StSConfig("fine", 32, "2d_sts_coarse_32",
                        crop=CropParams(patch_size=(1, 32, 32), proposal_threshold=0.3))
    new, _, changed = apply_plan_overrides(cascade, None, {"sts.crop.proposal_threshold": "none"})
    assert new.crop.proposal_threshold is None and cascade.crop.proposal_threshold == 0.3
    assert changed == {"sts.crop.proposal_threshold": {"plans": 0.3, "used": None}}
    assert apply_plan_overrides(cascade, None, {"sts.crop.proposal_threshold": 0.3})[2] == {}
    assert apply_plan_overrides(sts, None, {"sts.crop.proposal_threshold": 0.2})[0] == sts, "polar: no crop"
    # the fine stage's confirmation of proposals: the same rules
    new, _, changed = apply_plan_overrides(cascade, None, {"sts.crop.proposal_confirmation": 0.8,
                                                           "sts.crop.proposal_threshold": "none"})
    assert (new.crop.proposal_confirmation, new.crop.proposal_threshold) == (0.8, None)
    assert changed == {"sts.crop.proposal_threshold": {"plans": 0.3, "used": None},
                       "sts.crop.proposal_confirmation": {"plans": None, "used": 0.8}}
    assert apply_plan_overrides(new, None, {"sts.crop.proposal_confirmation": "none"})[0].crop.proposal_confirmation \
        is None


def test_the_overrides_record_next_to_the_predictions(tmp_path, monkeypatch):
    """Written when plan values were replaced; removed by a later run that predicted without
    overrides; left alone by a resumed run that had nothing to predict."""
    import json

    import torch

    from nnunet_stseg.adapters.predictor import StSPredictor

    monkeypatch.setenv("STSEG_POLAR_MAX_ORIGINS", "1")
    record = tmp_path / settings.OVERRIDES_FILE
    first = StSPredictor(device=torch.device("cpu"), allow_tqdm=False)
    first.sts = StSConfig("polar", 32, "2d_sts_coarse_32", polar=PolarParams((32, 32)))
    first._record_overrides({"sts.polar.max_origins": {"plans": 32, "used": 1}})
    first._write_overrides_record({str(tmp_path)})
    assert json.loads(record.read_text()) == {"plan_overrides": {"sts.polar.max_origins": {"plans": 32, "used": 1}},
                                              "variables": {"STSEG_POLAR_MAX_ORIGINS": "1"}}
    monkeypatch.delenv("STSEG_POLAR_MAX_ORIGINS")
    resumed = StSPredictor(device=torch.device("cpu"), allow_tqdm=False)  # nothing predicted: sts never read
    resumed._write_overrides_record({str(tmp_path)})
    assert record.is_file()
    later = StSPredictor(device=torch.device("cpu"), allow_tqdm=False)
    later.sts = first.sts
    later._write_overrides_record({str(tmp_path)})
    assert not record.exists()
