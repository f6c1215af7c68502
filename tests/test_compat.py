"""A different nnU-Net is one clear error naming the supported range (issue 16), checked on the
interface we rely on, not a crash deep in a worker."""
from __future__ import annotations

import warnings

import pytest
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_stseg.adapters import compat


def test_the_installed_nnunet_matches():
    assert compat.interface_problems() == []
    assert compat.version_supported(compat.check_nnunet())


def test_a_missing_or_changed_method_is_named(monkeypatch):
    monkeypatch.delattr(nnUNetPredictor, "_manage_input_and_output_lists")

    def changed(self, model_dir, folds, checkpoint_name="checkpoint_final.pth"):
        pass

    monkeypatch.setattr(nnUNetPredictor, "initialize_from_trained_model_folder", changed)
    problems = compat.interface_problems()
    assert "nnUNetPredictor._manage_input_and_output_lists is missing" in problems
    assert any(p.startswith("nnUNetPredictor.initialize_from_trained_model_folder takes (model_dir, folds")
               for p in problems)
    compat.check_nnunet.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"supports nnunetv2>=2.8.1,<2.9; the installed nnunetv2 .*"
                                               r"_manage_input_and_output_lists is missing"):
            compat.check_nnunet()
    finally:
        compat.check_nnunet.cache_clear()


def test_another_version_with_the_same_interface_warns(monkeypatch):
    monkeypatch.setattr(compat.metadata, "version", lambda name: "2.9.0")
    compat.check_nnunet.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert compat.check_nnunet() == "2.9.0"
        assert any("tested with nnunetv2>=2.8.1,<2.9; nnunetv2 2.9.0 is installed" in str(w.message) for w in caught)
    finally:
        compat.check_nnunet.cache_clear()
