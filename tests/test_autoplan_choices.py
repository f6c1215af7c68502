"""The planner-choices report: how one fine configuration at S serves classes of very different
sizes (each class's typical crop and how much S downsamples it), on a hand-made fingerprint."""
from __future__ import annotations

import json

import pytest

from benchmarks.autoplan_choices import class_crops


def _extent(z: float, y: float, x: float) -> list[dict]:
    return [{"p50": v} for v in (z, y, x)]


def test_class_crops_say_which_classes_s_downsamples(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "kidney": 2,
                                                                   "ignore": 3}}))
    summary = {"1": {"objects": 10, "extent_mm": _extent(7.7, 150.0, 180.0)},
               "2": {"objects": 20, "extent_mm": _extent(7.7, 40.0, 30.0)},
               "all": {"objects": 30, "extent_mm": _extent(7.7, 150.0, 180.0)}}
    sts = {"input_size": 64, "crop": {"margin_fraction": 0.125, "margin_min": 4.0}}
    crops = class_crops(summary, tmp_path, [1.25, 1.25], "2d", sts)
    assert set(crops) == {"liver", "kidney"}
    # liver: 180 mm / 1.25 = 144 px + 2 x 18 = 180 px -> 2.81 x; kidney: 32 px + 2 x 4 = 40 px -> not downsampled
    assert crops["liver"]["crop"] == pytest.approx(180.0) and crops["liver"]["downsampled"] == pytest.approx(2.81)
    assert crops["kidney"]["crop"] == pytest.approx(40.0) and crops["kidney"]["downsampled"] == 1.0
