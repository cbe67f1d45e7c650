"""The continual benchmark's search helpers: a grid is extended while its winner is at an edge, decisions are mapped
to domains, paired differences come with their t interval."""

import importlib.util
import math
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_continual", Path(__file__).resolve().parents[1] / "benchmarks" / "continual.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_extend_walks_past_an_edge_winner_and_stops_inside():
    scored = []

    def score(v):  # peak at 27
        scored.append(v)
        return -abs(math.log(v / 27))

    best, grid = bench.extend([1, 3, 9], score)
    assert best == 27 and grid == [1, 3, 9, 27, 81]  # 9 won at the top edge, then 27 inside
    assert sorted(scored) == [1, 3, 9, 27, 81]  # each value scored once


def test_extend_gives_up_after_its_steps_and_reports_the_edge():
    best, grid = bench.extend([1, 3, 9], lambda v: -v, steps=2)  # always smaller is better
    assert best == grid[0] == pytest.approx(1 / 9) and len(grid) == 5


def test_domain_of_and_paired_interval():
    starts = [0, 3, 6, 8]
    assert [bench.domain_of(starts, t) for t in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    # differences 1, 2, 3 points: mean 2, sd 1, t(2) = 4.303 -> half width 4.303 / sqrt(3)
    h = 4.303 / math.sqrt(3)
    assert bench.paired([0.11, 0.22, 0.33], [0.10, 0.20, 0.30]) == f"{2:+.1f} [{2 - h:+.1f}, {2 + h:+.1f}]"
