"""The skin-lesion atlases (issue 42): the converter (pairing, the 127 threshold of 1-bit and 8-bit
masks, resizing, the stratified seeded folds with a validation share outside each test fold) on
a generated atlas, and a smoke run of ``python -m benchmarks.experiment_skin`` with the nnU-Net
subprocesses replaced by ``fake_nnunet.FakeNNUNet`` (orchestration: the four trainings of a fold
in order, the second schedule from the coarse model's weights, every arm predicted in and out of
sample, the cascade on the second-schedule coarse model, resume, the report)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks.experiment_skin as experiment
import benchmarks.runner as runner
from benchmarks.skin import atlas_cases, convert_atlas, cv_folds, install_folds

from fake_nnunet import FakeNNUNet


def make_atlas(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """A tiny atlas in the source layout: RGB photos of odd sizes with a bright disc, masks 1-bit
    (even photos) or 8-bit with a grey ring of 100 outside the disc (odd photos: the ring is below
    the 127 threshold and must not become lesion)."""
    rng = np.random.default_rng(seed)
    for c, folder in enumerate(("melanoma", "notmelanoma")):
        (root / folder).mkdir(parents=True)
        for i in range(per_class):
            h, w = 40 + 3 * i, 52 - 2 * i
            yy, xx = np.mgrid[:h, :w]
            r = np.hypot(yy - h / 2, xx - w / 2)
            photo = (rng.random((h, w, 3)) * 60).astype(np.uint8)
            photo[r < 10] += 150
            name = f"{'AB'[c]}{i}"
            Image.fromarray(photo).save(root / folder / f"{name}_orig.jpg")
            disc = r < 10
            if i % 2 == 0:
                Image.fromarray(disc).convert("1").save(root / folder / f"{name}_contour.png")
            else:
                grey = np.where(disc, 255, np.where(r < 14, 100, 0)).astype(np.uint8)
                Image.fromarray(grey).save(root / folder / f"{name}_contour.png")
    return root


def test_the_converter_pairs_thresholds_resizes_and_folds(tmp_path):
    atlas = make_atlas(tmp_path / "dermis")
    ds = convert_atlas(atlas, tmp_path / "raw", 750, size=32, folds=2, seed=3)
    assert ds.name == "Dataset750_DermIS32"
    cases = sorted(p.name[:-len(".png")] for p in (ds / "labelsTr").glob("*.png"))
    assert cases == [f"mel_A{i}" for i in range(4)] + [f"non_B{i}" for i in range(4)]
    for case in cases:
        image = np.asarray(Image.open(ds / "imagesTr" / f"{case}_0000.png"))
        label = np.asarray(Image.open(ds / "labelsTr" / f"{case}.png"))
        assert image.shape == (32, 32, 3) and label.shape == (32, 32)
        assert set(np.unique(label)) == {0, 1}
        # the disc of radius 10 in a ~46 x ~46 photo is about a sixth of 32 px wide; the grey ring stays out
        assert 0.08 < label.mean() < 0.25, (case, label.mean())
    folds = json.loads((ds / "stseg_split.json").read_text())["folds"]
    assert sorted(sum((f["test"] for f in folds), [])) == cases  # every photo tested exactly once
    for f, fold in enumerate(folds):
        others = set(cases) - set(fold["test"])
        assert set(fold["train"]) | set(fold["val"]) == others and not set(fold["train"]) & set(fold["val"])
        assert len(fold["val"]) == 1  # 1/8 of 4 photos, at least one
        assert {c[:3] for c in fold["test"]} == {"mel", "non"}  # stratified
    splits = json.loads(install_folds(ds, tmp_path / "pp").read_text())
    assert splits == [{"train": f["train"], "val": f["val"]} for f in folds]
    # a rerun keeps what was written; another seed deals other folds
    assert convert_atlas(atlas, tmp_path / "raw", 750, size=32, folds=2, seed=3) == ds
    assert cv_folds(cases, 2, seed=4) != folds


def test_the_converter_names_the_unpaired_photo_and_the_wrong_folder(tmp_path):
    atlas = make_atlas(tmp_path / "dermquest", per_class=2)
    (atlas / "melanoma" / "A1_contour.png").unlink()
    with pytest.raises(ValueError, match=r"melanoma: 1 photo\(s\) without mask .*'A1'"):
        atlas_cases(atlas)
    with pytest.raises(FileNotFoundError, match="not a skin-lesion atlas folder"):
        atlas_cases(tmp_path)
    with pytest.raises(ValueError, match="at least 10 cases"):
        cv_folds(["mel_1", "non_2"], k=5)


def test_mask_threshold_of_an_8_bit_mask_is_127(tmp_path):
    from benchmarks.skin import load_case

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "p_orig.jpg")
    Image.fromarray(np.array([[127, 128, 0, 255]] * 4, np.uint8)).save(tmp_path / "p_contour.png")
    _, mask = load_case(tmp_path / "p_orig.jpg", tmp_path / "p_contour.png", None)
    assert mask[0].tolist() == [0, 1, 0, 1]


@pytest.mark.slow  # plans two generated atlases (in-process)
def test_skin_experiment_smoke_and_resume(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_atlas(data / "skin-lesions" / "dermis", seed=1)
    make_atlas(data / "skin-lesions" / "dermquest", per_class=5, seed=2)
    monkeypatch.setattr(runner, "_data_folder", None)  # --data sets it: restored after the test
    fake = FakeNNUNet().install(monkeypatch, experiment)
    work, out = tmp_path / "work", tmp_path / "report.md"
    args = ["--data", str(data), "--workdir", str(work), "--sizes", "16", "--features", "4", "--epochs", "2",
            "--iters", "2", "--batch_size", "2", "--folds", "2", "--run_folds", "0", "--resolution", "32",
            "--out", str(out)]
    experiment.main(args)
    trained = [(c.args[0], c.args[1], c.args[2], c.args[c.args.index("-tr") + 1]) for c in fake.of("nnUNetv2_train")]
    per_atlas = [("2d_sts_coarse_16", "0", "nnUNetTrainer_StSCoarse"), ("2d_sts_fine_16", "0", "nnUNetTrainer_StSFine"),
                 ("2d_sts_e2e_16", "0", "nnUNetTrainer_StSEndToEnd"),
                 ("2d_sts_coarse_16_x2", "0", "nnUNetTrainer_StSCoarse")]
    assert trained == [("Dataset750_DermIS32", *t) for t in per_atlas] + [("Dataset751_DermQuest32", *t)
                                                                          for t in per_atlas]
    second = fake.of("nnUNetv2_train")[3]
    start = second.args[second.args.index("-pretrained_weights") + 1]
    assert start.endswith("Dataset750_DermIS32/nnUNetTrainer_StSCoarse__nnUNetPlans__2d_sts_coarse_16/fold_0/"
                          "checkpoint_final.pth")
    assert (second.env["STSEG_PATIENCE"], second.env["STSEG_SKIP_VALIDATION"], second.env["STSEG_SAVE_EVERY"]) == (
        "10", "1", "5")
    plans = json.loads((work / "nnUNet_preprocessed" / "Dataset750_DermIS32" / "nnUNetPlans.json").read_text())
    configs = plans["configurations"]
    assert configs["2d_sts_fine_16_x2"]["sts"]["coarse_configuration"] == "2d_sts_coarse_16_x2"
    assert configs["2d_sts_coarse_16_x2"]["data_identifier"] == configs["2d_sts_coarse_16"]["data_identifier"]
    # the cascade on the second-schedule coarse model: the fine model's checkpoint, that coarse model embedded
    fine_x2 = torch.load(work / "nnUNet_results" / "Dataset750_DermIS32" / "nnUNetTrainer_StSFine__nnUNetPlans__"
                         "2d_sts_fine_16_x2" / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert fine_x2["init_args"]["configuration"] == "2d_sts_fine_16_x2"
    assert fine_x2["nnunet_stseg_companions"]["coarse"]["source"]["folder"].endswith("2d_sts_coarse_16_x2")
    predicted = [(Path(c.args[c.args.index("-i") + 1]).parent.name, Path(c.args[c.args.index("-i") + 1]).name,
                  c.args[c.args.index("-c") + 1], c.args[c.args.index("-f") + 1]) for c in fake.of("nnUNetv2_predict")]
    assert len(predicted) == 2 * 2 * 6  # two atlases x (in, out of sample) x six arms
    assert ("Dataset750_DermIS32", "fold_0", "2d_sts_coarse_16_of_2d_sts_e2e_16", "0") in predicted
    assert ("Dataset751_DermQuest32", "imagesTr", "2d_sts_fine_16_x2", "0") in predicted  # DermIS -> DermQuest
    results = json.loads((work / "results_skin.json").read_text())
    assert results["commands"] == [experiment.command_line(experiment.command_parser("experiment_skin", None), args)]
    row = results["runs"]["dermis 16"]
    folds = json.loads((work / "nnUNet_raw" / "Dataset750_DermIS32" / "stseg_split.json").read_text())["folds"]
    assert sorted(row["in"]["e2e"]["0"]["cases"]) == folds[0]["test"]
    assert len(row["dermquest"]["cascade"]["0"]["cases"]) == 10
    # epochs and seconds from the checkpoint's own log (the fake's two epochs: 0.5 s and 0.75 s)
    assert row["epochs"] == {k: {"0": 2} for k in ("coarse", "fine", "e2e", "coarse_x2")}
    assert row["train_s"]["e2e"] == {"0": 1.25}
    text = out.read_text()
    assert "![examples](report_examples.png)" in text and (tmp_path / "report_examples.png").stat().st_size > 0
    for heading in ("## Trained on DermIS, S = 16", "### DermIS -> DermQuest (out of sample)",
                    "### DermQuest (in sample)", "end-to-end vs U-Net, second schedule"):
        assert heading in text
    calls = len(fake.calls)
    experiment.main(args)  # resumed: nothing left to do
    assert len(fake.calls) == calls + 0
    experiment.main(["--data", str(data), "--workdir", str(work), "--report_only", "--out", str(out)])
    assert out.read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
