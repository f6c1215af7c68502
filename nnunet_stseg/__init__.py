"""nnunet-stseg: segment-then-segment methods for nnU-Net v2.

Layers (README "Layout", docs/design.md "Layout and layers"): the method core
(:mod:`nnunet_stseg.core`, pure numpy/torch, no nnU-Net), the nnU-Net adapters
(:mod:`nnunet_stseg.adapters`, ``nnunet_stseg.trainers``, ``nnunet_stseg.planners``), datasets
(:mod:`nnunet_stseg.data`) and the commands (:mod:`nnunet_stseg.commands`); settings from the
environment in :mod:`nnunet_stseg.settings`. Importing this package does not import nnU-Net.
"""
from importlib.metadata import PackageNotFoundError, version

from nnunet_stseg.adapters.discovery import ensure_trainer_discovery, trainer_discovery_dir

try:  # one place for the version: pyproject.toml (this said 0.9.3 through 0.9.5)
    __version__ = version("nnunet-stseg")
except PackageNotFoundError:  # a checkout on the path, not installed
    __version__ = "unknown"
__all__ = ["ensure_trainer_discovery", "trainer_discovery_dir", "__version__"]
