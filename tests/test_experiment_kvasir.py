"""Smoke runs of the Kvasir experiment command on 30 real images: it must convert and plan them,
train and predict every arm (the nnU-Net subprocesses replaced by ``fake_nnunet.FakeNNUNet``: this
checks orchestration; the real commands are checked in the trained-model tests), score both arms
on the test split, print the published numbers beside ours, draw its plot, and resume without
retraining."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.experiment_kvasir as experiment
from benchmarks.experiment_kvasir import PUBLISHED, main, miss_breakdown
from benchmarks.kvasir_arms import per_image_stats

from fake_nnunet import FakeNNUNet

KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"
pytestmark = pytest.mark.skipif(not (KVASIR / "images").is_dir(), reason=f"Kvasir-SEG not found at {KVASIR}")


@pytest.mark.slow  # converts and plans 30 real images (in-process, about 40 s)
def test_experiment_smoke_and_resume(tmp_path, monkeypatch):
    fake = FakeNNUNet().install(monkeypatch, experiment)
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--workdir", str(work), "--src", str(KVASIR), "--sizes", "32", "--features", "4", "--epochs", "1",
            "--iters", "5", "--limit", "30", "--out", str(out)]
    main(args)
    results = json.loads((work / "results.json").read_text())
    assert results["budget"]["n_test"] == 3
    for arm in ("baseline", "cascade"):
        r = results["sizes"]["32"][arm]
        assert r["n"] == 3 and 0 <= r["Dice"][0] <= 100 and r["ms_per_image"] > 0 and r["peak_rss_mb"] > 0
    text = out.read_text()
    assert "| 32 | baseline (published) | 72.41 |" in text and "| 32 | cascade (published) | 76.47 |" in text
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report_examples.png").read_bytes()[:4] == b"\x89PNG" and "![examples]" in text
    assert "Batch size (baseline / fine) per S: 32:" in text
    checkpoints = sorted((work / "nnUNet_results").rglob("checkpoint_final.pth"))
    assert len(checkpoints) == 2
    trained = sorted((c.args[1], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train"))
    assert trained == [("2d_sts_coarse_32", "nnUNetTrainer_StSCoarse"), ("2d_sts_fine_32", "nnUNetTrainer_StSFine")]
    assert len(fake.of("nnUNetv2_predict")) == 2
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    fake.calls.clear()
    main(args)  # resumes: predictions and scores again, no retraining
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    assert not fake.of("nnUNetv2_train") and not fake.of("nnunet-stseg")
    text = out.read_text()
    # the report rebuilt from results.json alone: same table, the command that made the results
    again = tmp_path / "again.md"
    main(["--workdir", str(work), "--report_only", "--out", str(again)])
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line for line in again.read_text().splitlines() if line.startswith("| ")] == table
    assert f"Command: `python -m benchmarks.experiment_kvasir {' '.join(args)}`" in again.read_text()
    assert "images the baseline misses" in text


@pytest.mark.slow
def test_native_experiment_smoke(tmp_path, monkeypatch):
    """Experiment 2: native resolution, the cascade vs nnU-Net's planned 2d narrowed to the same
    width and batch; predictions keep each image's own size."""
    from skimage.io import imread

    fake = FakeNNUNet().install(monkeypatch, experiment)

    work, out = tmp_path / "work", tmp_path / "native.md"
    main(["--native", "--workdir", str(work), "--src", str(KVASIR), "--sizes", "32", "--features", "4",
          "--batch_size", "2", "--epochs", "1", "--iters", "3", "--limit", "30", "--out", str(out)])
    results = json.loads((work / "results.json").read_text())
    assert set(results["arms"]) == {"nnunet_2d", "cascade_32"} and results["budget"]["batch_size"] == 2
    plans = json.loads(next((work / "nnUNet_preprocessed").glob("Dataset721_*/nnUNetPlans.json")).read_text())
    standard = plans["configurations"]["2d_w4"]
    assert standard["batch_size"] == 2 and standard["patch_size"] == plans["configurations"]["2d"]["patch_size"]
    assert standard["architecture"]["arch_kwargs"]["features_per_stage"][0] == 4
    ds = next((work / "nnUNet_raw").glob("Dataset721_*"))
    sizes = {imread(str(f)).shape[:2] for f in (ds / "imagesTs").glob("*.png")}
    assert len(sizes) > 1 or max(max(sz) for sz in sizes) > 256, "native resolution, not resized"
    for arm, r in results["arms"].items():
        assert r["n"] == 3 and 0 <= r["Dice"][0] <= 100 and r["ms_per_image"] > 0 and r["train_s"] > 0
        assert r["one_image_s"] > 0 and len(list((work / f"pred_one_{arm}").glob("*.png"))) == 1
        # the fake's log has no in-process line: the default run counts as workers, the other mode is run too
        assert r["mode"] == "workers" and set(r["ms_per_image_by_mode"]) == {"workers", "in_process"}
        for img in (ds / "imagesTs").glob("*.png"):
            pred = imread(str(Path(r["prediction"]) / img.name.replace("_0000", "")))
            assert pred.shape == imread(str(img)).shape[:2], arm
    text = out.read_text()
    assert "| nnU-Net 2d |" in text and "| cascade S = 32 |" in text and "batch 2" in text
    trained = sorted((c.args[1], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train"))
    assert ("2d_w4", "nnUNetTrainer_StSCoarse") in trained and ("2d_sts_fine_32", "nnUNetTrainer_StSFine") in trained
    assert all(c.env.get("STSEG_SKIP_VALIDATION") == "1" for c in fake.of("nnUNetv2_train"))
    modes = [c.env.get("STSEG_PREDICT_IN_PROCESS") for c in fake.of("nnUNetv2_predict")]
    assert modes.count("1") == 2, modes  # the other mode, once per arm
    assert (tmp_path / "native_examples.png").read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again.md"  # --report_only recognises the native results without --native
    main(["--workdir", str(work), "--report_only", "--out", str(again)])
    assert again.read_text().splitlines()[:12] == text.splitlines()[:12]


def test_published_table_matches_the_paper_digest():
    # ../shared/docs/methods.md section 1 (Kvasir-SEG rows of Table A1)
    assert PUBLISHED["baseline"][64][0] == 81.76 and PUBLISHED["cascade"][64][0] == 83.82
    assert PUBLISHED["baseline"][128][3] == 88.93 and PUBLISHED["cascade"][48][3] == 85.76


def test_per_image_stats(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"metric_per_case": [
        {"metrics": {"1": {"Dice": 0.5, "IoU": 0.25, "Precision": 1.0, "Recall": 0.5}}},
        {"metrics": {"1": {"Dice": 1.0, "IoU": 1.0, "Precision": 1.0, "Recall": 1.0}}}]}))
    s = per_image_stats(f)
    assert s["n"] == 2 and s["Dice"] == (75.0, 25.0) and s["Precision"] == (100.0, 0.0)


def _summary(folder: Path, dice: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    (folder / "summary_test.json").write_text(json.dumps({"metric_per_case": [
        {"prediction_file": str(folder / name), "metrics": {"1": {"Dice": d}}} for name, d in dice.items()]}))


def test_miss_breakdown_splits_images_by_the_baseline_detection(tmp_path):
    _summary(tmp_path / "b", {"a.png": 0.0, "b.png": 0.8, "c.png": 0.6})
    _summary(tmp_path / "c", {"a.png": 0.05, "b.png": 0.9, "c.png": 0.7})
    results = {"sizes": {32: {"baseline": {"prediction": str(tmp_path / "b")},
                              "cascade": {"prediction": str(tmp_path / "c")}}}}
    assert miss_breakdown(results)[-1] == "| 32 | 1 of 3 | 70.00 | 80.00 | 5.00 |"
    results["sizes"][32]["cascade"]["prediction"] = str(tmp_path / "missing")
    assert miss_breakdown(results) == []


def test_report_only_needs_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--workdir", str(tmp_path), "--report_only"])
    assert "results.json does not exist" in capsys.readouterr().err


def test_native_findings_compare_each_cascade_with_nnunet_2d():
    from benchmarks.experiment_kvasir import native_findings, report_native

    def arm(dice, recall, ms, train, mode="in_process"):
        other = {"in_process": "workers", "workers": "in_process"}[mode]
        return {"Dice": (dice, 10.0), "IoU": (dice - 10, 10.0), "Precision": (dice, 5.0), "Recall": (recall, 5.0),
                "ms_per_image": ms, "peak_rss_mb": 1000.0, "train_s": train, "one_image_s": 10.0,
                "ms_per_more_image": ms - 100.0, "mode": mode, "ms_per_image_by_mode": {mode: ms, other: 2 * ms}}

    results = {"budget": {"features": 16, "batch_size": 8, "epochs": 4, "iters": 50, "device": "cpu", "seed": 0,
                          "n_test": 100, "standard_patch": [640, 640]},
               "arms": {"nnunet_2d": arm(80.0, 85.0, 2000.0, 3000.0, "workers"),
                        "cascade_64": arm(78.5, 86.0, 400.0, 500.0),
                        "cascade_128": arm(70.0, 75.0, 2500.0, 900.0)}}
    c64, c128, cost = native_findings(results)
    assert "S = 64 vs nnU-Net 2d: DSC -1.50 points, recall +1.00, inference 5.0 x faster (0.20 x its time per " \
           "image; 0.16 x per further image; both arms with nnU-Net's workers 0.40 x, both in process 0.10 x), " \
           "training 500 vs 3000 s: within 2 DSC points, predicting faster" in c64
    assert "S = 128" in c128 and "DSC -10.00" in c128 and "more than 2 DSC points behind, not faster" in c128
    assert "took 15.0 s here (its 200 iterations" in cost
    text = report_native(results, "cmd")
    assert "| cascade S = 64 | 78.50 ± 10.00 |" in text and c64 in text
    assert "| 400 | 10.0 | 300 | 400 | 800 | 1000 | 500 |" in text
    assert "nnU-Net 2d with nnU-Net's worker processes, cascade S = 64 in the command's own process" in text
    results["arms"]["cascade_64"]["Dice"] = (80.5, 10.0)
    assert "DSC +0.50 points" in native_findings(results)[0] and "ahead in DSC, predicting faster" in native_findings(results)[0]
    del results["arms"]["nnunet_2d"]
    assert native_findings(results) == []
