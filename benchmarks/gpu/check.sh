#!/usr/bin/env bash
# GPU readiness check: bash benchmarks/gpu/check.sh [--dry-run] [OUT_DIR]   (OUT_DIR defaults to $OUT)
# Installs what this Python lacks from benchmarks/gpu/wheels/ (see wheels.txt, fetch_wheels.sh), then runs the gpu
# tests, the GPU presets, the GPU benchmarks and the main job within 8 minutes, and writes summary.json /
# summary.md / check.log into OUT_DIR. Exit status 0 when every verdict passes (and for a clean dry run).
# PYTHON picks the interpreter (default python3: on the lent GPU machines, the one that holds PyTorch).
set -uo pipefail
started=$(date +%s.%N)
exec "${PYTHON:-python3}" "$(dirname "$0")/check.py" --started "$started" "$@"
