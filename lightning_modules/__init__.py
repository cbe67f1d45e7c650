"""Thin LightningModules: they wire models, losses, metrics and optimizers from `models/`."""
