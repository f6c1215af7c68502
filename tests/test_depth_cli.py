"""Depth channel end to end through the STOCK nnU-Net commands on a tiny generated 3D dataset
(the shared models of ``trained_models.py``, trained once per run).

- ``nnunet-stseg plan --depth``: the 2d segment-then-segment pipeline (coarse and fine) with the
  depth channel, trained with the usual trainers (the configuration switches it on), predicted
  with ``nnUNetv2_predict`` through nnU-Net's worker processes AND its sequential path
  (``-npp 0 -nps 0``): both add the channel, so the outputs are identical.
- ``nnUNetv2_train D 2d F -tr nnUNetTrainer_Depth`` on nnU-Net's own 2d configuration, then
  ``nnUNetv2_predict -tr nnUNetTrainer_Depth``.
Accuracy is not asserted (a few CPU iterations).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_stseg.commands.pipeline import predict_command_line, run

from trained_models import model_folder

pytestmark = pytest.mark.slow


def _input_channels(checkpoint: Path) -> int:
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 4)
    return int(first.shape[1])


def _same_geometry_and_values(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.nii.gz"))
    assert files and files == sorted(p.name for p in b.glob("*.nii.gz"))
    for name in files:
        ia, ib = sitk.ReadImage(str(a / name)), sitk.ReadImage(str(b / name))
        assert (ia.GetSize(), ia.GetSpacing(), ia.GetOrigin(), ia.GetDirection()) == \
               (ib.GetSize(), ib.GetSpacing(), ib.GetOrigin(), ib.GetDirection())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib), err_msg=name)


@pytest.fixture(scope="module")
def depth_pipeline(trained_3d):
    """The shared 3D models: the 2d cascade planned with --depth (arms ``cascade_2d_depth``,
    predicted through nnU-Net's worker processes, and ``coarse_2d_depth``) and
    ``nnUNetTrainer_Depth`` on nnU-Net's 2d configuration (arm ``depth_2d``)."""
    return trained_3d


def test_cascade_with_depth_channel_through_stock_commands(depth_pipeline, tmp_path):
    res = depth_pipeline
    for trainer, config in (("nnUNetTrainer_StSCoarse", res.coarse_config_2d),
                            ("nnUNetTrainer_StSFine", res.fine_config_2d)):
        folder = model_folder(res, trainer, config)
        assert _input_channels(folder / "fold_0" / "checkpoint_final.pth") == 2  # image + depth
        assert "depth channel: ON" in next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    for arm in ("cascade_2d_depth", "coarse_2d_depth"):
        inputs = sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz"))
        for f in inputs:
            pred = sitk.ReadImage(str(res.predictions[arm] / f.name.replace("_0000", "")))
            img = sitk.ReadImage(str(f))
            assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
                   (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    # nnU-Net's sequential path (no worker processes) adds the same channel: identical outputs
    out = tmp_path / "predictions_sequential"
    run(predict_command_line(res.dataset_folder / "imagesTs", out, res.dataset_id, res.fine_config_2d,
                             "nnUNetTrainer_StSFine", [0], "cpu", "--disable_tta", "-npp", "0", "-nps", "0"),
        res.env, tmp_path / "predict_sequential.log")
    _same_geometry_and_values(res.predictions["cascade_2d_depth"], out)


def test_depth_trainer_on_nnunet_2d_configuration(depth_pipeline):
    res = depth_pipeline
    folder = model_folder(res, "nnUNetTrainer_Depth", "2d")
    assert _input_channels(folder / "fold_0" / "checkpoint_final.pth") == 2
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()  # nnU-Net's validation ran with depth
    out = res.predictions["depth_2d"]
    for f in sorted((res.dataset_folder / "imagesTs").glob("*_0000.nii.gz")):
        pred, img = sitk.ReadImage(str(out / f.name.replace("_0000", ""))), sitk.ReadImage(str(f))
        assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
               (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())
