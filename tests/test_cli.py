"""The one ``nnunet-stseg`` command: every subcommand answers --help under its own name, and the
plan options travel from the command line into one typed PlanOptions by keyword."""
from __future__ import annotations

import argparse

import pytest

from nnunet_stseg.adapters.config import PlanOptions
from nnunet_stseg.commands.cli import DELEGATED, _plan_parser, main, plan_options_from_args


@pytest.mark.parametrize("name", sorted(DELEGATED) + ["plan", "env"])
def test_every_subcommand_has_help_under_its_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: nnunet-stseg {name}")


def test_the_help_lists_the_user_commands_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("command\n", 1)[1].split("options:")[0].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert sorted(listed) == ["bundle", "demo", "env", "overlay", "plan", "predict", "sizes"]


BENCHMARK_COMMANDS = ["benchmark", "compare_checkouts", "experiment_cardiac3d", "experiment_depth", "experiment_e2e", "experiment_kvasir",
                      "experiment_lsnet", "experiment_polar", "experiment_recall", "experiment_sizes", "kvasir",
                      "polar_round_trip"]


@pytest.mark.parametrize("name", BENCHMARK_COMMANDS)
def test_every_benchmark_command_has_help_under_its_module_name(name, capsys):
    """The experiments run from a checkout as ``python -m benchmarks.<name>``; their reports record
    that command line."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{name}")


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment-foo"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nnunet-stseg {version('nnunet-stseg')}"


def _options(*argv: str) -> PlanOptions:
    return plan_options_from_args(_plan_parser(argparse.ArgumentParser()).parse_args(["-d", "1", *argv]))


def test_plan_options_from_the_command_line():
    assert _options() == PlanOptions()
    o = _options("-s", "48", "--dims", "2d", "--features", "8", "--max_features", "64", "--batch_size", "4",
                 "--set", "crop.margin_fraction=0.2", "--set", "crop.min_object_size=3", "--set", "fallback=whole",
                 "--depth", "--polar", "--set", "polar.fusion_high=0.3", "--set", "crop.size_rule_grid=coarse")
    rule = {"min_object_size": 3.0, "size_rule_grid": "coarse"}  # one size rule for crops and polar origins
    assert o == PlanOptions(input_size=48, dims=("2d",), base_features=8, max_features=64, batch_size=4,
                            crop={"margin_fraction": 0.2, **rule}, fallback="whole",
                            depth_channel=True, polar=True, polar_params={"fusion_high": 0.3, **rule})
    # the polar stage's own size rule, when given, is its own
    assert _options("--set", "crop.min_object_size=3", "--set", "polar.min_object_size=7").polar_params == {
        "min_object_size": 7.0}
    # the recall-first switches: a number, or 'none' for the published rule
    o = _options("--set", "crop.proposal_threshold=0.2", "--set", "crop.proposal_confirmation=0.9",
                 "--set", "crop.negative_fraction=0.25")
    assert o.crop == {"proposal_threshold": 0.2, "proposal_confirmation": 0.9, "negative_fraction": 0.25}
    assert _options("--set", "crop.proposal_threshold=none", "--set", "crop.proposal_confirmation=None").crop == {
        "proposal_threshold": None, "proposal_confirmation": None}
    # every block under sts: top-level keys, centre, e2e, L-SNet
    o = _options("--set", "max_crops=8", "--set", "objects_report=0", "--set", "centre.loss=mse",
                 "--set", "centre.peak_threshold=0.3", "--set", "e2e.box_rule=objects", "--set", "lsnet.gamma=0",
                 "--set", "coarse_resampling=nnunet")
    assert (o.sts_params, o.centre_loss, o.centre_params, o.e2e_params, o.lsnet_params, o.coarse_resampling) == (
        {"max_crops": 8, "objects_report": False}, "mse", {"peak_threshold": 0.3}, {"box_rule": "objects"},
        {"gamma": 0.0}, "nnunet")


def test_plan_set_refuses_unknown_keys_and_bad_values(capsys):
    with pytest.raises(ValueError, match=r"--set: unknown key 'crop\.margin'; valid keys: .*crop\.margin_fraction"):
        _options("--set", "crop.margin=0.2")
    with pytest.raises(ValueError, match="not block.key=value"):
        _options("--set", "crop.margin_fraction")
    with pytest.raises(ValueError, match="crop.margin_min='wide' is not float"):
        _options("--set", "crop.margin_min=wide")
    with pytest.raises(ValueError, match="sizes configure"):
        _options("--set", "sizes.size_weight=1")
    with pytest.raises(ValueError, match="proposal_confirmation must be"):
        _options("--set", "crop.proposal_confirmation=0.3")
    # the command says it in one line, before any planning work
    with pytest.raises(SystemExit, match="nnunet-stseg plan: error: --set: unknown key 'polar.fusion'"):
        main(["plan", "-d", "1", "--set", "polar.fusion=0.3"])


def test_the_plan_options_of_0_8_still_work_with_a_warning(capsys):
    o = _options("--margin_fraction", "0.2", "--min_object_size", "3", "--confidence_weighting",
                 "--proposal_threshold", "none", "--fallback", "whole", "--e2e_box_rule", "objects")
    assert o == PlanOptions(crop={"margin_fraction": 0.2, "min_object_size": 3.0, "proposal_threshold": None},
                            polar_params={"min_object_size": 3.0, "confidence_weighting": True}, fallback="whole",
                            e2e_params={"box_rule": "objects"})
    err = capsys.readouterr().err
    assert "--margin_fraction is deprecated and will be removed in 0.10; use --set crop.margin_fraction=0.2" in err
    assert "use --set polar.confidence_weighting=true" in err
    # and they are not in the help any more
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--margin_fraction" not in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,message", [({"input_size": 4}, ">= 8"), ({"dims": ("4d",)}, "dimensionality"),
                                            ({"fallback": "none"}, "fallback"), ({"crop": {"margin": 1}}, "margin"),
                                            ({"polar_params": {"fusion_hi": 1}}, "fusion_hi"),
                                            ({"batch_size": 0}, "batch_size"),
                                            ({"crop": {"proposal_confirmation": 0.3}}, r"proposal_confirmation must be")])
def test_plan_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlanOptions(**kwargs)


def test_plan_options_are_keyword_only():
    with pytest.raises(TypeError):
        PlanOptions(64, ("2d",))  # noqa
