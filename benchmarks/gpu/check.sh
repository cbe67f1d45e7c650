#!/usr/bin/env bash
# GPU readiness check: bash benchmarks/gpu/check.sh [--dry-run] [OUT_DIR]   (OUT_DIR defaults to $OUT)
# Installs what this Python lacks from benchmarks/gpu/wheels/ (see wheels.txt, fetch_wheels.sh), then runs the gpu
# tests, the GPU presets, the GPU benchmarks and the main job within 8 minutes, and writes summary.json /
# summary.md / check.log into OUT_DIR. Exit status 0 when every verdict passes (always 0 for a clean dry run).
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/../.." || exit 2
exec "${PYTHON:-python3}" benchmarks/gpu/check.py --started "$started" "$@"
