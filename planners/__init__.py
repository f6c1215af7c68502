"""nnU-Net experiment planners of nnunet-stseg (installed as ``nnunet_stseg.planners``):
:class:`~nnunet_stseg.planners.sts_planner.nnUNetPlannerStS` and
:func:`~nnunet_stseg.planners.plan_and_preprocess.plan_and_preprocess`.

Kept import-free: nnU-Net's planner lookup and our command line import the modules they need."""
