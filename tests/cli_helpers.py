"""Driving the command line from tests."""

import sys
from pathlib import Path

import cli

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]):
    """Run ``python -m cli ARGS`` in-process (pytest's own argv hidden from LightningCLI); returns the CLI."""
    saved, sys.argv = sys.argv, ["cli"]
    try:
        return cli.main(args)
    finally:
        sys.argv = saved
