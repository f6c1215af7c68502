"""nnunet-stseg: segment-then-segment methods for nnU-Net v2.

Geometry (:mod:`nnunet_stseg.geometry`) has no nnU-Net imports; trainers, planners and the
predictor are thin adapters around it. Importing this package does not import nnU-Net.
"""
from nnunet_stseg.env import ensure_trainer_discovery, trainer_discovery_dir

__version__ = "0.1.0"
__all__ = ["ensure_trainer_discovery", "trainer_discovery_dir", "__version__"]
