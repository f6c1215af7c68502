"""Tiny smoke runs of the benchmark command: it must run end to end and write its report and
plot atomically. The figures themselves are not asserted (speed is measured, not tested).

The command measures every point in a fresh spawned process (its own peak RSS), and nnU-Net's
planning inside it spawns its own pool: each spawn imports torch and nnU-Net again. Here they
fork instead (``stand_ins.fork_instead_of_spawn``): the same code runs, without the imports."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from benchmarks.benchmark import main

from stand_ins import fork_instead_of_spawn

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fork():
    with fork_instead_of_spawn():  # torch on one thread meanwhile (the points ask for all cores)
        yield


def test_per_stage_report(tmp_path, capsys):
    out = tmp_path / "per_stage.md"
    main(["-s", "32", "--features", "4", "--objects", "2", "--shape2d", "96", "96", "--shape3d", "16", "48", "48",
          "--out", str(out)])
    text = out.read_text()
    rows = [l for l in text.splitlines() if l.startswith("| 2d ") or l.startswith("| 3d ")]
    assert [(r.split("|")[1].strip(), r.split("|")[3].strip()) for r in rows] == [
        ("2d", "nnunet"), ("2d", "antialiased"), ("3d", "nnunet"), ("3d", "antialiased")]  # before / since 0.8
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[3]) >= 1, "the oracle coarse output must give at least one crop"
        assert re.fullmatch(r"\d+%", cells[14]) and float(cells[15]) > 0  # other than networks, limit
    assert "Machine:" in text and not list(tmp_path.glob(".tmp_*"))


def test_scaling_report_and_plot(tmp_path):
    out, plot = tmp_path / "scaling.md", tmp_path / "scaling.png"
    main(["--scaling", "-s", "32", "--features", "4", "--objects_list", "3", "--scaling_size", "96",
          "--sizes", "64", "--scaling_objects", "2", "--plot", str(plot), "--out", str(out)])
    text = out.read_text()
    data_rows = [l for l in text.splitlines() if re.match(r"\| \d", l)]
    assert len(data_rows) == 2  # one point per sweep
    assert data_rows[0].startswith("| 3 | 3 |"), "3 objects placed -> 3 crops with the oracle mask"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp_*"))


def test_memory_report(tmp_path, monkeypatch, capfd):
    out, scratch = tmp_path / "memory.md", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the benchmark's work folders go here
    main(["--memory", "-s", "32", "--features", "4", "--memory_shape", "16", "48", "48", "--memory_objects", "1", "3",
          "--memory_with_probabilities", "--profile", "4", "--out", str(out)])
    printed = capfd.readouterr().out
    # each row's profile: its header, then cProfile's table of the 4 functions longest in themselves
    for header in re.findall(r"--- profile of the prediction, (\d) objects \(\d+ crops\) ---", printed):
        assert header in "13"
    assert len(re.findall(r"--- profile of the prediction", printed)) == 3
    assert len(re.findall(r"List reduced from \d+ to 4 due to restriction <4>", printed)) == 3
    text = out.read_text()
    table = [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines() if l.startswith("| cascade")]
    assert [(r[0], r[1]) for r in table] == [("cascade", "1"), ("cascade", "3"), ("cascade, --save_probabilities", "1")]
    rows = table[:2]
    volume_mb = 4 * 16 * 48 * 48 / 2 ** 20
    for cells in table:
        before, during, before_export, process = float(cells[11]), float(cells[12]), float(cells[13]), float(cells[16])
        assert 0 < before <= process and 0 < during <= process and 0 < before_export <= during
        assert float(cells[8]) > 0  # seconds per crop outside the networks
        assert float(cells[15]) == pytest.approx((during - before) / volume_mb, abs=0.01 + 1 / volume_mb)
        assert 0 <= float(cells[10].rstrip("%")) <= float(cells[9].rstrip("%"))  # geometry within outside
    # the conversion to labels: only without probabilities (sub-millisecond here, so only whether it ran)
    assert table[2][5] == "-" and all(float(r[5]) >= 0 for r in rows)
    standard = [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines()
                if l.startswith("| nnU-Net 3d_fullres |")]
    assert len(standard) == 1 and float(standard[0][12]) >= float(standard[0][13]) > 0
    assert float(standard[0][12]) >= float(standard[0][11]) > 0
    ratios = re.search(r"Cascade peak / 3d_fullres peak: 1 objects ([\d.]+), 3 objects ([\d.]+)", text)
    assert ratios and float(ratios[1]) == pytest.approx(float(rows[0][12]) / float(standard[0][12]), abs=0.01)
    assert re.search(r"Of 'before', \d+ MiB \([\d.]+ x the float32 volume\) is torch, nnU-Net", text)
    assert not list(scratch.glob("stseg_bench_*")), "every generated case is removed"
    # the rows are kept: the report is rebuilt from them, measuring nothing, with the measuring command
    main(["--memory", "--memory_rows", str(out.with_suffix(".json")), "--out", str(tmp_path / "again.md")])
    again = (tmp_path / "again.md").read_text()
    assert [l for l in again.splitlines() if l.startswith("|")] == [l for l in text.splitlines() if l.startswith("|")]
    assert re.search(r"Command: `[^`]*--memory_objects 1 3", again) and "--memory_rows" not in again


def test_fine_batches_report(tmp_path, monkeypatch):
    out, scratch = tmp_path / "fine_batches.md", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    main(["--fine_batches", "1", "3", "-s", "16", "--features", "4", "--shape3d", "16", "48", "48", "--out", str(out)])
    text = out.read_text()
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines() if re.match(r"\| \d", l)]
    assert [(r[0], r[1]) for r in rows] == [("1", "9"), ("3", "9")], "every batch full, at least 8 crops"
    assert all(r[2] == "16x16x16" and float(r[4]) > 0 for r in rows)
    assert not list(scratch.glob("stseg_bench_*")), "every generated case is removed"


def test_size_loss_report(tmp_path):
    out = tmp_path / "size_loss.md"
    main(["--size_loss", "--size_loss_sides", "16", "--size_loss_batch", "2", "--features", "4", "--size_loss_steps",
          "4", "--out", str(out)])
    rows = [l for l in out.read_text().splitlines() if l.startswith("| 16 ")]
    assert len(rows) == 1
    cells = [float(c) for c in rows[0].strip("|").split("|")]
    assert cells[4] > 0 and cells[3] >= cells[2] > 0  # every pixel costs more naive flips than object + border
    trace = [l for l in out.read_text().splitlines() if l.startswith("| 6 |") or l.startswith("| 14 |")]
    assert [l.split("|")[2].strip() for l in trace] == ["0", "1", "2", "4"] * 2
    assert all(l.split("|")[5].strip() == "8" for l in trace[:1])  # the start: argmax size 8


def test_prediction_modes_report(tmp_path, monkeypatch):
    """Orchestration of ``--prediction_modes`` (the stand-in predicts): each mode over the images
    and on the first image alone, the in-process variable and worker flags as the table says, and
    the label maps compared with the in-process ones."""
    from benchmarks import prediction_modes
    from nnunet_stseg.data.synthetic import make_synthetic_dataset

    from fake_nnunet import FakeNNUNet

    fake, inputs = FakeNNUNet(), []

    def counting(cmd, env, log=None, quiet=False):  # the input folders exist only while the command runs
        inputs.append(len(list(Path(cmd[cmd.index("-i") + 1]).iterdir())))
        return fake(cmd, env, log, quiet)

    monkeypatch.setattr(prediction_modes, "run_measured", counting)
    ds = make_synthetic_dataset(tmp_path / "raw", dataset_id=977, dim=2, n_train=1, n_test=3)
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text((ds / "dataset.json").read_text())
    out = tmp_path / "modes.md"
    main(["--prediction_modes", "-m", str(model), "-i", str(ds / "imagesTs"), "--out", str(out)])
    calls = fake.of("nnUNetv2_predict_from_modelfolder")
    assert [c.env["STSEG_PREDICT_IN_PROCESS"] for c in calls] == ["1", "1", "0", "0", "0", "0"]
    assert [("-npp" in c.args) for c in calls] == [False, False, False, False, True, True]
    assert inputs == [3, 1] * 3, "each mode: all images, then the first alone"
    text = out.read_text()
    for mode in ("in process", "workers, -npp 3 -nps 3", "workers, -npp 1 -nps 1"):
        assert re.search(rf"\| {re.escape(mode)} \| [0-9.]+ \| [0-9.]+ \| [0-9]+ \| [0-9]+ \| 3 of 3 \|", text), text
    assert "3 images from" in text
    with pytest.raises(SystemExit, match="no images"):
        main(["--prediction_modes", "-m", str(model), "-i", str(tmp_path)])
