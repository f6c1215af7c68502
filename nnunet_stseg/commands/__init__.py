"""Commands: the ``nnunet-stseg`` command line (what users run: env, plan, predict, bundle, sizes,
overlay, demo) and :mod:`nnunet_stseg.commands.pipeline`, which runs the stock nnU-Net commands
for the demo (and for the experiments in the checkout's ``benchmarks/`` folder, never installed).

The top layer: may import every other part of the package; nothing imports it."""
