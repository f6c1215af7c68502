"""The package's layers (README "Layout", docs/design.md "Layout and layers"): every module imports
only what its layer may, so the method core stays free of nnU-Net and nothing depends on the
commands; the experiments and benchmarks (``benchmarks/``, a top-level folder that is never
installed) may use everything, and nothing installed uses them. Checked on the source (every import
statement, also those inside functions)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"nnunet_stseg": ROOT / "nnunet_stseg", "nnunet_stseg.trainers": ROOT / "trainers",
                "nnunet_stseg.planners": ROOT / "planners"}

# layer -> the nnunet_stseg layers it may import (itself always), and whether nnU-Net is allowed
RULES = {
    "core": ({"core", "atomic"}, False),
    "settings": (set(), False),
    "atomic": (set(), False),
    "data": ({"core", "atomic"}, True),
    "adapters": ({"core", "settings", "atomic"}, True),
    "trainers": ({"core", "settings", "atomic", "adapters"}, True),
    "planners": ({"core", "settings", "atomic", "adapters"}, True),
    "commands": ({"core", "settings", "atomic", "adapters", "trainers", "planners", "data"}, True),
    "package": ({"adapters"}, False),  # nnunet_stseg/__init__.py
}
# the one crossing allowed: trainer discovery needs the folder of the (import-free) shim package
EXCEPTIONS = {("adapters", "nnunet_stseg.trainers.ext")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1].removesuffix(".py")


def modules():
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            name = ".".join([prefix, *rel.parts]).removesuffix(".__init__")
            if prefix == "nnunet_stseg" and rel.parts[0] in ("trainers", "planners"):
                continue
            yield name, path


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "nnunet_stseg"}
    return names


ALL = list(modules())


def test_every_module_belongs_to_a_layer():
    assert {layer_of(m) for m, _ in ALL} <= set(RULES)
    assert len(ALL) > 30


@pytest.mark.parametrize("module,path", ALL, ids=[m for m, _ in ALL])
def test_imports_follow_the_layers(module, path):
    layer = layer_of(module)
    allowed, nnunet_ok = RULES[layer]
    bad = []
    for name in imported(path):
        if name.split(".")[0] == "benchmarks":
            bad.append(name)  # never installed: a user's import would fail
        elif name.split(".")[0] in ("nnunetv2", "batchgenerators", "batchgeneratorsv2") and not nnunet_ok:
            bad.append(name)
        elif name.startswith("nnunet_stseg.") and (layer, name) not in EXCEPTIONS:
            target = layer_of(name)
            if target != layer and target not in allowed:
                bad.append(name)
    assert bad == [], f"{module} ({layer}) may import only {sorted(allowed)}" + ("" if nnunet_ok else ", no nnU-Net")


def test_the_core_runs_without_importing_nnunet():
    code = ("import sys, nnunet_stseg.core.geometry, nnunet_stseg.core.fusion, nnunet_stseg.core.polar, "
            "nnunet_stseg.core.depth, nnunet_stseg.core.centres, nnunet_stseg.core.metrics, nnunet_stseg.core.cascade, "
            "nnunet_stseg.settings; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'batchgenerators')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_benchmarks_are_not_installed_and_import_only_the_package():
    """``benchmarks/`` is no package of the wheel, and its modules import the package, each other,
    nnU-Net and libraries, never the tests."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [p for p in project["tool"]["setuptools"]["packages"] if p.split(".")[0] == "benchmarks"]
    assert len(BENCHMARKS) > 10
    for path in BENCHMARKS:
        assert not {n for n in imported(path) if n.split(".")[0] in ("tests", "conftest", "trained_models",
                                                                         "stand_ins")}, path.name


def test_no_help_log_or_error_text_names_a_tracker_issue():
    """Users read help texts, logs and errors: none of them (nor a docstring that serves as a
    command's help) refers to the project's issue tracker."""
    import re

    pattern = re.compile(r"\bissues? #?\d+|\bthe issue's\b", re.IGNORECASE)
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in (*PACKAGE_DIRS.values(), ROOT / "benchmarks")
                 for path in sorted(folder.rglob("*.py")) for i, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


HOOKS_MODULE = "nnunet_stseg.adapters.nnunet_hooks"
FRAME_ATTRIBUTES = {"_getframe", "currentframe", "f_back", "f_locals"}


def hooks_into_nnunet(path: Path) -> list[str]:
    """What in a module's source is one of the tricks that belong to :data:`HOOKS_MODULE`: reading
    frames (``sys._getframe``, ``inspect.currentframe``, ``.f_back``, ``.f_locals``), assigning an
    object's ``__class__``, ``sys.excepthook`` or ``multiprocessing.get_context`` (also through
    ``setattr``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in FRAME_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("sys", "inspect"):
            found += [f"line {node.lineno}: import of {a.name}" for a in node.names if a.name in FRAME_ATTRIBUTES]
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in (t for top in targets for t in ast.walk(top)):
                if isinstance(target, ast.Attribute) and (
                        target.attr == "__class__" or any(
                            target.attr == attr and isinstance(target.value, ast.Name) and target.value.id == module
                            for module, attr in (("sys", "excepthook"), ("multiprocessing", "get_context")))):
                    found.append(f"line {node.lineno}: assignment to .{target.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in ("__class__", "excepthook", "get_context")):
            found.append(f"line {node.lineno}: setattr of {node.args[1].value}")
    return found


def test_the_hooks_into_nnunet_live_in_one_module():
    """Every frame inspection, class swap and excepthook is in ``adapters/nnunet_hooks.py``, whose
    docstring lists them with the nnU-Net behaviour each relies on (docs/design.md)."""
    assert HOOKS_MODULE in dict(ALL)
    assert hooks_into_nnunet(dict(ALL)[HOOKS_MODULE]), "the check finds the hooks where they are"
    offenders = {module: found for module, path in ALL if module != HOOKS_MODULE
                 for found in [hooks_into_nnunet(path)] if found}
    assert offenders == {}, f"move these into {HOOKS_MODULE}: {offenders}"
