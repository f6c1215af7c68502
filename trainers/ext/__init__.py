"""Folder to list in nnUNet_extTrainer; see nnunet_stseg.adapters.discovery."""
