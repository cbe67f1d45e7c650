"""TrackNetV3's evaluation rule: adaptlab's ``peak_method: v3`` against the reference transcriptions of
``tests/test_tracknet_v3_eval.py`` on many random maps; prints the number of disagreements (target: 0).

    python benchmarks/tracknet_v3_rule.py               # 100 000 random binary maps (OpenCV if installed)
    python benchmarks/tracknet_v3_rule.py --maps 1000000 --blob-maps 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from test_tracknet_v3_eval import (  # noqa: E402
    batched_boxes,
    blob_maps,
    random_masks,
    ref_boxes_cv2,
    ref_boxes_python,
    ref_evaluate,
)

from models.metrics.tracknet import OUTCOMES, classify, detect_peaks, v3_label_centres, v3_truncate  # noqa: E402
from models.utils.memory import cpu_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=100_000, help="random binary maps (box rule)")
    parser.add_argument("--blob-maps", type=int, default=2000, help="64x36 probability maps (whole evaluate rule)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import cv2

        ref, ref_name = ref_boxes_cv2, f"OpenCV {cv2.__version__} findContours"
    except ImportError:
        ref, ref_name = ref_boxes_python, "plain-Python transcription (OpenCV not installed)"
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; reference: {ref_name}")
    rng = np.random.default_rng(args.seed)
    masks = random_masks(rng, args.maps)
    t0 = time.perf_counter()
    ours = batched_boxes(masks)
    t1 = time.perf_counter()
    want = np.array([ref(m) for m in masks])
    t2 = time.perf_counter()
    box_bad = int((ours != want).any(1).sum())
    maps, labels = blob_maps(rng, args.blob_maps, (64, 36))
    src = (1280, 720)
    expect = [ref_evaluate(m, (lx, ly) if vis else (0.0, 0.0), src, ref) for m, (vis, lx, ly) in zip(maps, labels)]
    trunc = torch.tensor([v3_truncate(lx, ly, src, (64, 36)) if vis else (0, 0) for vis, lx, ly in labels])
    true_xy, visible = v3_label_centres(trunc, torch.tensor(labels[:, 0] > 0), (64, 36))
    xy, found = detect_peaks(torch.from_numpy(maps), 0.5, "v3")
    outcomes = classify(xy, found, true_xy, visible, 4.0)
    got = [next(k for k in OUTCOMES if outcomes[k][i]) for i in range(len(maps))]
    eval_bad = sum(g != e[0] for g, e in zip(got, expect))
    counts = {k: got.count(k) for k in OUTCOMES}
    print("| check | maps | disagreements | adaptlab s | reference s |\n|---|---:|---:|---:|---:|")
    print(f"| largest-region box (random binary maps up to 12x12) | {len(masks)} | {box_bad} | {t1 - t0:.2f} | "
          f"{t2 - t1:.2f} |")
    print(f"| outcome (64x36 maps, 0-3 blobs, labels from 1280x720) | {len(maps)} | {eval_bad} | - | - |")
    print(f"outcomes: {counts}")


if __name__ == "__main__":
    main()
