"""Utilities that are not models (atomic file writes)."""
