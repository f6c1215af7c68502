"""Shim imported by nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

nnU-Net imports modules of that folder as top-level names and drops them afterwards, so nothing
is defined here: the real classes come from the installed package and stay picklable."""
from nnunet_stseg.trainers.centre_trainer import *  # noqa: F401,F403
from nnunet_stseg.trainers.crop_guided_trainer import *  # noqa: F401,F403
from nnunet_stseg.trainers.lsnet_trainer import *  # noqa: F401,F403
from nnunet_stseg.trainers.polar_trainer import *  # noqa: F401,F403
from nnunet_stseg.trainers.size_trainer import *  # noqa: F401,F403
from nnunet_stseg.trainers.sts_trainers import *  # noqa: F401,F403
