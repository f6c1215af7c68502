"""The package's layers (README "Layout", docs/design.md "Layout and layers"): every module imports
only what its layer may, so the method core stays free of nnU-Net and nothing depends on the
commands. Checked on the source (every import statement, also those inside functions)."""
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
        if name.split(".")[0] in ("nnunetv2", "batchgenerators", "batchgeneratorsv2") and not nnunet_ok:
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
