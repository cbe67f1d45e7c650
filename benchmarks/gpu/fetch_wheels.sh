#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu/check.sh installs on a bare GPU machine (benchmarks/gpu/wheels.txt:
# exact versions, dependencies included) into benchmarks/gpu/wheels/ (ignored by git). Run it on a machine with
# PyPI access, then carry the folder to the GPU machine (the device tool's `carry` moves at most 64 MiB).
#   bash benchmarks/gpu/fetch_wheels.sh          # Python 3.12, x86-64 Linux (PYVER=3.11 etc. for another Python)
# bitsandbytes ships one CUDA library per CUDA version (a 41 MiB wheel); the wheel is rewritten to keep only the
# libraries for CUDA $BNB_CUDA (default 13: the lent machines' torch is cu130; both 13.0 and 13.2 kept) and the
# CPU one, so the folder fits the carry limit. Prints each wheel's size.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
BNB_CUDA=${BNB_CUDA:-13}
mkdir -p wheels
mapfile -t specs < <(sed -e 's/#.*//' wheels.txt | awk 'NF {print $1}')
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64; do plats+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plats[@]}" \
  -d wheels "${specs[@]}"
"$PY" - "$BNB_CUDA" "${specs[@]}" <<'PYEOF'
"""Keep one wheel per listed spec (drop others) and slim bitsandbytes to the CUDA major version asked for."""
import re
import sys
import zipfile
from pathlib import Path

keep_cuda, specs = sys.argv[1], sys.argv[2:]
stems = [re.sub(r"[-_.]+", "_", s.split("==")[0]).lower() + "-" + s.split("==")[1] + "-" for s in specs]
for wheel in sorted(Path("wheels").glob("*.whl")):
    if not any(wheel.name.lower().startswith(stem) for stem in stems):
        print(f"removing {wheel.name} (not in wheels.txt)")
        wheel.unlink()
for wheel in Path("wheels").glob("bitsandbytes-*.whl"):
    before = wheel.stat().st_size
    drop = re.compile(rf"bitsandbytes/libbitsandbytes_(rocm|xpu|cuda(?!{keep_cuda}))[^/]*\.so$")
    with zipfile.ZipFile(wheel) as src:
        names = [n for n in src.namelist() if not drop.search(n)]
        if len(names) == len(src.namelist()):
            continue
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in names:
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(ln for ln in lines if not drop.search(ln.split(",")[0])) + "\n").encode()
                dst.writestr(src.getinfo(name), data)
    tmp.replace(wheel)
    print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {wheel.stat().st_size / 2**20:.1f} MiB "
          f"(CUDA {keep_cuda}.x and CPU libraries kept)")
total = 0
for wheel in sorted(Path("wheels").glob("*.whl")):
    total += wheel.stat().st_size
    print(f"  {wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
print(f"  {total / 2**20:7.1f} MiB  in benchmarks/gpu/wheels/ (the device tool carries at most 64 MiB in all)")
PYEOF
