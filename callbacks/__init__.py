"""Callbacks shared by every family: stability, recovery, multi-rate stepping, consolidation, diagnostics."""
