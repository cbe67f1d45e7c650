"""Triton 4-bit dequantize kernel vs the torch reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before
triton decorates the kernel, and other tests may already have imported it in this process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("triton")  # the only reason to skip the interpreter test

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import torch
from torch import nn
from triton.runtime.interpreter import InterpretedFunction
from models import quant as q
from models.quant.triton_dequant import _dequantize_4bit_kernel, dequantize_4bit_triton

torch.manual_seed(0)
out = {"interpreted": isinstance(_dequantize_4bit_kernel, InterpretedFunction), "cases": []}
for quant_type in ("nf4", "fp4"):
    for double_quant in (False, True):
        for shape, block_size in (((37, 29), 64), ((300, 70), 64), ((8, 50), 32)):
            state = q.quantize_4bit(torch.randn(*shape) * 0.1, quant_type, block_size, double_quant)
            for dtype in (torch.float32, torch.bfloat16):
                ref = q.dequantize_4bit(state, dtype)
                got = dequantize_4bit_triton(state, dtype)
                out["cases"].append({
                    "case": f"{quant_type}-dq{double_quant}-{shape}-{block_size}-{dtype}",
                    "device": str(got.device), "dtype_ok": got.dtype == dtype, "shape_ok": got.shape == ref.shape,
                    "exact": torch.equal(got, ref),
                    "within_ulp": torch.allclose(got.float(), ref.float(), rtol=2**-7, atol=0),
                })
layer = q.Linear4bit.from_linear(nn.Linear(96, 40), "nf4", "float32", use_double_quant=True)
out["layer_equal"] = torch.equal(dequantize_4bit_triton(layer.quant_state(), torch.float32), layer.dequantize_weight())
print("RESULT" + json.dumps(out))
"""


def test_triton_kernel_matches_torch_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["interpreted"]  # the kernel really is the interpreted Triton function
    assert len(result["cases"]) == 24 and result["layer_equal"]
    for case in result["cases"]:
        assert case["device"] == "cpu" and case["dtype_ok"] and case["shape_ok"], case
        # fp32: the same arithmetic, bit for bit. bf16: the interpreter rounds fp32 -> bf16 differently
        # from torch (round to nearest even), so allow one bf16 ulp.
        assert case["exact"] if "float32" in case["case"] else case["within_ulp"], case
    assert sum(c["exact"] for c in result["cases"]) >= 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_cuda_and_used_by_linear4bit(monkeypatch):
    from models import quant as q
    from models.quant import triton_dequant as qt

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            state = q.quantize_4bit(torch.randn(1000, 333, device="cuda"), quant_type, 64, double_quant)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                ref = q.dequantize_4bit(state, dtype)
                # the GPU may fuse code * scale + offset into one FMA: allow an ulp-level difference
                torch.testing.assert_close(qt.dequantize_4bit_triton(state, dtype), ref, rtol=1e-5, atol=1e-6)
    calls = []
    real = qt.dequantize_4bit_triton
    monkeypatch.setattr(qt, "dequantize_4bit_triton", lambda *a: calls.append(1) or real(*a))
    lin = nn.Linear(256, 128).cuda()
    layer = q.Linear4bit.from_linear(lin, "nf4", torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert len(calls) == 2 and y.dtype == torch.float32 and x.grad is not None  # forward + backward
    expected = x.detach() @ layer.dequantize_weight(torch.float32).t() + lin.bias
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=5e-2)  # bf16 matmul vs fp32
