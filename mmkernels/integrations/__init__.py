"""Trainer integrations of the balancer protocol (README "The protocol").

Each integration is its own module and imports its trainer only when imported itself, so `import
mmkernels.integrations` never needs an optional dependency:

- mmkernels.integrations.lightning: BalancerCallback, any balancer with a PyTorch Lightning LightningModule
  (`pip install mmkernels[lightning]`; docs/integrations/lightning.md).
"""
