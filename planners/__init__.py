"""nnU-Net experiment planners of nnunet-stseg (installed as ``nnunet_stseg.planners``)."""
from nnunet_stseg.planners.sts_planner import nnUNetPlannerStS, add_sts_configurations

__all__ = ["nnUNetPlannerStS", "add_sts_configurations"]
