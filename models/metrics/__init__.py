"""Evaluation metrics as plain functions and torchmetrics Metrics (continual learning, TrackNet)."""
