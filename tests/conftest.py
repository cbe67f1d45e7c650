"""Shared test settings: small thread counts (CI has 2 cores) and a per-test working directory helper."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test from a temporary directory so `runs/` output never lands in the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning threads make small steps many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
