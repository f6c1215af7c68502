"""Trainer discovery for the stock nnU-Net commands, precision/recall in summary.json and the
schedule overrides of the trainers."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_stseg.adapters.discovery import ENV_VAR, ensure_trainer_discovery, shell_export_line, trainer_discovery_dir
from nnunet_stseg.atomic import write_json_atomic
from nnunet_stseg.core.metrics import add_precision_recall

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# trainer discovery
# ----------------------------------------------------------------------------------------------

def test_discovery_dir_holds_the_shim():
    d = Path(trainer_discovery_dir())
    assert d.is_dir()
    assert (d / "nnunet_stseg_trainer_shim.py").is_file()


def test_ensure_trainer_discovery_is_idempotent_and_keeps_entries(monkeypatch, tmp_path):
    other = tmp_path / "my_trainers"
    other.mkdir()
    existing = os.pathsep.join([str(other), "/does/not/exist"])
    monkeypatch.setenv(ENV_VAR, existing)
    d = ensure_trainer_discovery()
    assert d == trainer_discovery_dir()
    first = os.environ[ENV_VAR]
    assert ensure_trainer_discovery() == d
    assert ensure_trainer_discovery() == d
    assert os.environ[ENV_VAR] == first
    parts = first.split(os.pathsep)
    assert parts.count(d) == 1
    assert parts[0] == d
    assert parts[1:] == [str(other), "/does/not/exist"]


def test_ensure_trainer_discovery_from_unset(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    d = ensure_trainer_discovery()
    assert os.environ[ENV_VAR] == d


def test_nnunet_finds_the_real_trainer_classes(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_stseg.trainers import sts_trainers

    monkeypatch.setenv(ENV_VAR, "/does/not/exist")
    ensure_trainer_discovery()
    fine_a = recursive_find_trainer_class_by_name("nnUNetTrainer_StSFine")
    fine_b = recursive_find_trainer_class_by_name("nnUNetTrainer_StSFine")
    assert fine_a is sts_trainers.nnUNetTrainer_StSFine
    assert fine_b is fine_a
    assert fine_a.__module__ == "nnunet_stseg.trainers.sts_trainers"
    assert pickle.loads(pickle.dumps(fine_a)) is fine_a
    coarse = recursive_find_trainer_class_by_name("nnUNetTrainer_StSCoarse")
    assert coarse is sts_trainers.nnUNetTrainer_StSCoarse
    assert pickle.loads(pickle.dumps(coarse)) is coarse
    # the shim's temporary top-level module does not linger
    assert "nnunet_stseg_trainer_shim" not in sys.modules


def test_nnunet_without_discovery_does_not_find_them(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(RuntimeError, match="nnUNetTrainer_StSFine"):
        recursive_find_trainer_class_by_name("nnUNetTrainer_StSFine")


def _cli(*args: str) -> str:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    proc = subprocess.run([sys.executable, "-m", "nnunet_stseg.commands.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_env_prints_export_line_and_dir():
    d = trainer_discovery_dir()
    out = _cli("env").strip()
    assert out == shell_export_line()
    assert out.startswith(f"export {ENV_VAR}=")
    assert d in out
    # the line works in a shell and keeps existing entries
    sh = subprocess.run(["bash", "-c", f'{out}; printf %s "${ENV_VAR}"'], stdout=subprocess.PIPE, text=True,
                        env={"PATH": os.environ.get("PATH", ""), ENV_VAR: "/x/y"}, check=True)
    assert sh.stdout == f"{d}{os.pathsep}/x/y"
    sh = subprocess.run(["bash", "-c", f'{out}; printf %s "${ENV_VAR}"'], stdout=subprocess.PIPE, text=True,
                        env={"PATH": os.environ.get("PATH", "")}, check=True)
    assert sh.stdout == d
    out_dir = _cli("env", "--dir").strip()
    assert out_dir == d
    assert (Path(out_dir) / "nnunet_stseg_trainer_shim.py").is_file()


# ----------------------------------------------------------------------------------------------
# precision / recall
# ----------------------------------------------------------------------------------------------

def _m(tp, fp, fn, tn=1000):
    dice = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else float("nan")
    iou = tp / (tp + fp + fn) if (tp + fp + fn) > 0 else float("nan")
    return {"Dice": dice, "IoU": iou, "FP": fp, "TP": tp, "FN": fn, "TN": tn,
            "n_pred": tp + fp, "n_ref": tp + fn}


def _summary() -> dict:
    cases = [
        {"1": _m(8, 2, 0), "2": _m(3, 1, 1)},
        {"1": _m(0, 0, 5), "2": _m(6, 0, 2)},   # label 1: nothing predicted -> precision undefined
        {"1": _m(4, 4, 4), "2": _m(0, 0, 0)},   # label 2: empty everywhere -> both undefined
    ]
    per_case = [{"metrics": m, "prediction_file": f"/p/c{i}.nii.gz", "reference_file": f"/r/c{i}.nii.gz"}
                for i, m in enumerate(cases)]
    mean = {lab: {k: float("nan") for k in ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")}
            for lab in ("1", "2")}
    return {"foreground_mean": {"Dice": 0.5, "IoU": 0.4}, "mean": mean, "metric_per_case": per_case}


def test_add_precision_recall_exact_values(tmp_path):
    f = tmp_path / "summary.json"
    with open(f, "w") as fh:
        json.dump(_summary(), fh, indent=4)
    out = add_precision_recall(str(f))
    pc = out["metric_per_case"]
    assert pc[0]["metrics"]["1"]["Precision"] == pytest.approx(0.8)
    assert pc[0]["metrics"]["1"]["Recall"] == pytest.approx(1.0)
    assert pc[0]["metrics"]["2"]["Precision"] == pytest.approx(0.75)
    assert pc[0]["metrics"]["2"]["Recall"] == pytest.approx(0.75)
    assert math.isnan(pc[1]["metrics"]["1"]["Precision"])
    assert pc[1]["metrics"]["1"]["Recall"] == pytest.approx(0.0)
    assert pc[1]["metrics"]["2"]["Precision"] == pytest.approx(1.0)
    assert pc[1]["metrics"]["2"]["Recall"] == pytest.approx(0.75)
    assert pc[2]["metrics"]["1"]["Precision"] == pytest.approx(0.5)
    assert pc[2]["metrics"]["1"]["Recall"] == pytest.approx(0.5)
    assert math.isnan(pc[2]["metrics"]["2"]["Precision"])
    assert math.isnan(pc[2]["metrics"]["2"]["Recall"])
    # nanmean over cases per label
    assert out["mean"]["1"]["Precision"] == pytest.approx((0.8 + 0.5) / 2)
    assert out["mean"]["1"]["Recall"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert out["mean"]["2"]["Precision"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["mean"]["2"]["Recall"] == pytest.approx((0.75 + 0.75) / 2)
    # foreground mean: over labels
    assert out["foreground_mean"]["Precision"] == pytest.approx(((0.8 + 0.5) / 2 + 0.875) / 2)
    assert out["foreground_mean"]["Recall"] == pytest.approx((0.5 + 0.75) / 2)
    # the cases the nanmean skipped are counted: label 1 is empty in case 1, label 2 in case 2; no case
    # is empty for every label
    assert out["mean"]["1"]["n_empty_predictions"] == 1 and out["mean"]["2"]["n_empty_predictions"] == 1
    assert out["foreground_mean"]["n_empty_predictions"] == 0
    # existing metrics untouched
    assert out["foreground_mean"]["Dice"] == 0.5
    assert pc[0]["metrics"]["1"]["TP"] == 8
    assert pc[0]["prediction_file"] == "/p/c0.nii.gz"
    # the file holds what was returned and nothing is left behind
    with open(f) as fh:
        on_disk = json.load(fh)
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(out, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    # idempotent: running again gives the same numbers
    again = add_precision_recall(str(f))
    assert json.dumps(again, sort_keys=True) == json.dumps(out, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_add_precision_recall_all_undefined_is_nan(tmp_path):
    s = _summary()
    for case in s["metric_per_case"]:
        case["metrics"]["1"] = _m(0, 0, 3)
        case["metrics"]["2"] = _m(0, 0, 0)
    f = tmp_path / "summary.json"
    with open(f, "w") as fh:
        json.dump(s, fh)
    out = add_precision_recall(str(f))
    assert math.isnan(out["mean"]["1"]["Precision"])
    assert out["mean"]["1"]["Recall"] == 0.0
    assert math.isnan(out["mean"]["2"]["Precision"]) and math.isnan(out["mean"]["2"]["Recall"])
    assert math.isnan(out["foreground_mean"]["Precision"])
    assert out["foreground_mean"]["Recall"] == 0.0
    assert out["foreground_mean"]["n_empty_predictions"] == 3  # nothing predicted anywhere
    with open(f) as fh:
        assert math.isnan(json.load(fh)["foreground_mean"]["Precision"])
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_json_atomic_leaves_no_temp_file_on_error(tmp_path):
    f = tmp_path / "x.json"
    write_json_atomic({"a": 1}, str(f))
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, str(f))
    with open(f) as fh:
        assert json.load(fh) == {"a": 1}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_atomic_figure_failure_keeps_the_old_file(tmp_path):
    """A figure that fails while being saved (a kill mid-write looks the same to a reader) leaves
    the previous PNG in place and no temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nnunet_stseg.atomic import write_atomic

    fig = plt.figure()
    target = write_atomic(tmp_path / "plots" / "p.png", figure=fig)
    before = target.read_bytes()
    assert before[:4] == b"\x89PNG"

    class Broken:
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, figure=Broken())
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == ["p.png"]
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# schedule overrides
# ----------------------------------------------------------------------------------------------

def test_skip_validation_switch(monkeypatch):
    """STSEG_SKIP_VALIDATION=1 replaces the final validation by a log line; 0/unset keep it;
    anything else is an error naming the variable."""
    from nnunet_stseg.trainers.sts_trainers import _StSScheduleMixin

    class Trainer(_StSScheduleMixin):
        def __init__(self):
            self.logged = []

        def print_to_log_file(self, *args):
            self.logged.append(" ".join(map(str, args)))

        def perform_actual_validation(self, save_probabilities=False):
            return "validated"

    for value in ("", "0"):
        monkeypatch.setenv("STSEG_SKIP_VALIDATION", value)
        t = Trainer()
        t._apply_schedule_overrides()
        assert t.perform_actual_validation() == "validated"
    monkeypatch.setenv("STSEG_SKIP_VALIDATION", "1")
    t = Trainer()
    t._apply_schedule_overrides()
    assert t.perform_actual_validation() is None and "final validation skipped" in t.logged[-1]
    assert t.logged[0] == "nnunet-stseg settings from the environment: STSEG_SKIP_VALIDATION=1"
    monkeypatch.setenv("STSEG_SKIP_VALIDATION", "yes")
    with pytest.raises(ValueError, match="STSEG_SKIP_VALIDATION='yes': expected 0 or 1"):
        Trainer()._apply_schedule_overrides()


def test_validation_mirroring_switch(monkeypatch):
    """STSEG_VAL_MIRRORING=0 runs the class's own validation with the mirroring axes off and puts
    them back afterwards (also when the validation fails); 1/unset leave them; anything else is an
    error naming the variable; STSEG_SKIP_VALIDATION=1 still wins."""
    from nnunet_stseg.trainers.sts_trainers import _StSScheduleMixin

    class Trainer(_StSScheduleMixin):
        fail = False

        def __init__(self):
            self.logged, self.inference_allowed_mirroring_axes = [], (0, 1)

        def print_to_log_file(self, *args):
            self.logged.append(" ".join(map(str, args)))

        def perform_actual_validation(self, save_probabilities=False):
            if self.fail:
                raise RuntimeError("validation failed")
            return self.inference_allowed_mirroring_axes

    monkeypatch.setattr("nnunet_stseg.trainers.sts_trainers.default_num_processes", 2)
    monkeypatch.delenv("STSEG_SKIP_VALIDATION", raising=False)
    for value in ("", "1"):
        monkeypatch.setenv("STSEG_VAL_MIRRORING", value)
        t = Trainer()
        t._apply_schedule_overrides()
        assert t.perform_actual_validation() == (0, 1)
    monkeypatch.setenv("STSEG_VAL_MIRRORING", "0")
    t = Trainer()
    t._apply_schedule_overrides()
    assert t.perform_actual_validation() is None
    assert t.inference_allowed_mirroring_axes == (0, 1) and "without mirroring" in t.logged[-1]
    t.fail = True
    with pytest.raises(RuntimeError, match="validation failed"):
        t.perform_actual_validation()
    assert t.inference_allowed_mirroring_axes == (0, 1)
    monkeypatch.setenv("STSEG_SKIP_VALIDATION", "1")
    t = Trainer()
    t._apply_schedule_overrides()
    assert t.perform_actual_validation() is None and "final validation skipped" in t.logged[-1]
    monkeypatch.delenv("STSEG_SKIP_VALIDATION")
    monkeypatch.setenv("STSEG_VAL_MIRRORING", "no")
    with pytest.raises(ValueError, match="STSEG_VAL_MIRRORING='no': expected 0 or 1"):
        Trainer()._apply_schedule_overrides()


@pytest.mark.parametrize("processes", [1, 2])
def test_the_final_validation_pools_of_one_process_are_threads(monkeypatch, processes):
    """With nnUNet_def_n_proc=1 the pools nnU-Net starts in the final validation (export, metrics)
    are one thread of the training process, with more they are nnU-Net's spawned workers; the
    real ``multiprocessing.get_context`` is back afterwards, also when the validation fails."""
    import multiprocessing
    import multiprocessing.pool

    from nnunet_stseg.trainers.sts_trainers import _StSScheduleMixin

    real = multiprocessing.get_context

    class Trainer(_StSScheduleMixin):
        inference_allowed_mirroring_axes = None

        def print_to_log_file(self, *args):
            pass

        def perform_actual_validation(self, save_probabilities=False):
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                assert pool.starmap(max, [(1, 2)]) == [2]
                if save_probabilities:
                    raise RuntimeError("validation failed")
                return type(pool), multiprocessing.get_context("fork").get_start_method()

    monkeypatch.setattr("nnunet_stseg.trainers.sts_trainers.default_num_processes", processes)
    monkeypatch.delenv("STSEG_SKIP_VALIDATION", raising=False)
    monkeypatch.delenv("STSEG_VAL_MIRRORING", raising=False)
    t = Trainer()
    t._apply_schedule_overrides()
    pool_type, other = t.perform_actual_validation()
    assert (pool_type is multiprocessing.pool.ThreadPool) == (processes == 1) and other == "fork"
    assert multiprocessing.get_context is real
    with pytest.raises(RuntimeError, match="validation failed"):
        t.perform_actual_validation(True)
    assert multiprocessing.get_context is real


def test_train_fold_resumes_continues_or_only_validates(tmp_path, monkeypatch):
    """The experiments' resume rule: nothing when finished, --c after an interruption, --val when
    only the validation is missing (not a retraining from scratch), a plain start otherwise."""
    import benchmarks.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run", lambda cmd, env, log=None, quiet=False: calls.append(cmd[1:]) or 1.5)
    env = {"nnUNet_results": str(tmp_path)}
    fold = tmp_path / "Dataset001_X" / "Tr__nnUNetPlans__2d" / "fold_0"

    def train(**kw):
        calls.clear()
        seconds = runner.train_fold("Dataset001_X", "2d", 0, "Tr", "cpu", env, tmp_path / "log.txt", **kw)
        return seconds, calls[0][-1] if calls else None

    assert train() == (1.5, "cpu")
    assert calls[0][:5] == ["Dataset001_X", "2d", "0", "-tr", "Tr"]
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"")
    assert train() == (1.5, "--c")
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert train() == (None, None)
    assert train(need_validation=True) == (1.5, "--val")
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    assert train(need_validation=True) == (None, None)


def test_a_resumed_training_keeps_its_schedule(tmp_path, monkeypatch):
    """The schedule a training started with is recorded in its fold folder; --c under other
    STSEG_* values is an error naming both schedules (it silently changed the schedule before)."""
    import json

    from nnunet_stseg.trainers.sts_trainers import SCHEDULE_FILE, _StSScheduleMixin

    class Base:
        def on_train_start(self):
            self.started = True

    class Trainer(_StSScheduleMixin, Base):
        def __init__(self, epoch=0):
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
            self.save_every, self.current_epoch, self.local_rank = 50, epoch, 0
            self.output_folder, self.logged = str(tmp_path / "fold_0"), []
            self._apply_schedule_overrides()

        def print_to_log_file(self, *args, **kwargs):
            self.logged.append(" ".join(map(str, args)))

    monkeypatch.setenv("STSEG_NUM_EPOCHS", "2")
    Trainer().on_train_start()
    record = json.loads((tmp_path / "fold_0" / SCHEDULE_FILE).read_text())
    assert record == {"schedule": {"num_epochs": 2, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50},
                      "variables": {"STSEG_NUM_EPOCHS": 2}}
    resumed = Trainer(epoch=1)
    resumed.on_train_start()
    assert resumed.started
    monkeypatch.delenv("STSEG_NUM_EPOCHS")  # --c in a shell without the smoke-run variables
    with pytest.raises(RuntimeError, match=r"was started with the schedule \{'num_epochs': 2.*this run would "
                                           r"continue it with \{'num_epochs': 1000"):
        Trainer(epoch=1).on_train_start()
    (tmp_path / "fold_0" / SCHEDULE_FILE).unlink()  # a training started before the record existed
    legacy = Trainer(epoch=1)
    legacy.on_train_start()
    assert "no schedule record" in legacy.logged[-1] and (tmp_path / "fold_0" / SCHEDULE_FILE).is_file()


def test_report_cells_count_the_cases_a_mean_of_precision_skips():
    """A missed case (empty prediction) lowers DSC and recall but not the mean precision; the
    report cells say how many cases that mean left out, and an old results file says n/a."""
    from benchmarks.reports import OVERLAP_HEAD, overlap_cells, overlap_means
    from nnunet_stseg.core.metrics import overlap

    gt = np.array([1, 1, 0, 0], bool)
    found, missed = overlap(gt.copy(), gt), overlap(np.zeros(4, bool), gt)
    scores = overlap_means("polyp", [found, found, missed])
    assert scores["polyp_Precision"] == (1.0, 0.0)
    assert scores["polyp_Recall"][0] == pytest.approx(2 / 3) and scores["polyp_Dice"][0] == pytest.approx(2 / 3)
    assert scores["polyp_empty_predictions"] == 1
    cells = overlap_cells(scores, "polyp").split(" | ")
    assert len(cells) == len(OVERLAP_HEAD.split(" | ")) and cells[2] == "1.000 ± 0.000" and cells[-1] == "1"
    del scores["polyp_empty_predictions"]
    assert overlap_cells(scores, "polyp").endswith("| n/a")


def test_hd95_is_in_millimetres_of_each_axis_and_undefined_for_one_empty_mask():
    from nnunet_stseg.core.metrics import hd95

    a = np.zeros((12, 20, 20), bool)
    a[2:6, 5:15, 5:15] = True
    shifted = np.roll(a, 3, axis=0)  # three slices further along z
    assert hd95(a, shifted, (2.0, 0.5, 0.5)) == pytest.approx(6.0)  # 3 slices of 2 mm
    assert hd95(a, shifted, (1.0, 0.5, 0.5)) == pytest.approx(3.0)
    assert hd95(a, np.roll(a, 1, axis=2), (2.0, 0.5, 0.5)) == pytest.approx(0.5)  # one pixel in x
    assert hd95(a, a, (1, 1, 1)) == 0.0 and hd95(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 0.0
    assert math.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))
