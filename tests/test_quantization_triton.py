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


FUSED_SCRIPT = r"""
import json
import torch
from triton.runtime.interpreter import InterpretedFunction
from models import quant as q
from models.quant.triton_dequant import _matmul_4bit_kernel, matmul_4bit_triton

torch.manual_seed(0)
out = {"interpreted": isinstance(_matmul_4bit_kernel, InterpretedFunction), "cases": []}
for quant_type in ("nf4", "fp4"):
    for double_quant in (False, True):
        for (n_out, n_in), block_size, lead in (((70, 45), 64, (2, 19)), ((33, 96), 32, (5,)), ((128, 64), 64, (40,))):
            state = q.quantize_4bit(torch.randn(n_out, n_in) * 0.1, quant_type, block_size, double_quant)
            for dtype in (torch.float32, torch.bfloat16):
                w = q.dequantize_4bit(state, dtype)
                a, g = torch.randn(*lead, n_in).to(dtype), torch.randn(*lead, n_out).to(dtype)
                fwd, bwd = matmul_4bit_triton(a, state, transpose=True), matmul_4bit_triton(g, state, transpose=False)
                ref_f = a.double() @ w.double().t()  # exact sums of the same (rounded) operands
                ref_b = g.double() @ w.double()
                out["cases"].append({
                    "case": f"{quant_type}-dq{double_quant}-{n_out}x{n_in}-{block_size}-{lead}-{dtype}",
                    "shapes_ok": fwd.shape == (*lead, n_out) and bwd.shape == (*lead, n_in),
                    "dtype_ok": fwd.dtype == dtype and bwd.dtype == dtype,
                    "err_f": ((fwd.double() - ref_f).abs().max() / ref_f.abs().max()).item(),
                    "err_b": ((bwd.double() - ref_b).abs().max() / ref_b.abs().max()).item(),
                    "torch_err_f": ((a @ w.t()).double() - ref_f).abs().max().item() / ref_f.abs().max().item(),
                })
try:
    matmul_4bit_triton(torch.randn(3, 44), state)
    out["shape_error"] = False
except ValueError:
    out["shape_error"] = True
print("RESULT" + json.dumps(out))
"""


def test_fused_dequantize_matmul_matches_torch_under_interpreter():
    """Forward (a @ W^T) and input gradient (g @ W) of the fused kernel against float64 products of the same
    operands, relative to the largest output: float32 within 1e-6 (fp32 sums in another order), bfloat16 within
    2^-5 (a few bf16 ulps: output rounding plus the interpreter's own fp32 -> bf16 rounding of W); a wrong code,
    nibble or block scale gives errors of order 1."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FUSED_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert result["interpreted"] and result["shape_error"] and len(result["cases"]) == 24
    for case in result["cases"]:
        assert case["shapes_ok"] and case["dtype_ok"], case
        bound = 1e-6 if "float32" in case["case"] else 2**-5
        assert case["err_f"] < bound and case["err_b"] < bound, case
        assert case["torch_err_f"] < bound, case  # the torch path meets the same bound


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
    real = qt.matmul_4bit_triton
    monkeypatch.setattr(qt, "matmul_4bit_triton", lambda *a, **k: calls.append(k) or real(*a, **k))
    lin = nn.Linear(256, 128).cuda()
    layer = q.Linear4bit.from_linear(lin, "nf4", torch.bfloat16)
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    # the fused kernel runs twice: forward (a @ W^T) and input gradient (g @ W)
    assert [c["transpose"] for c in calls] == [True, False] and y.dtype == torch.float32 and x.grad is not None
    torch.testing.assert_close(x.grad, layer.dequantize_weight(torch.bfloat16).float().sum(0).expand(4, 256),
                               rtol=2e-2, atol=2e-2)
    expected = x.detach() @ layer.dequantize_weight(torch.float32).t() + lin.bias
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=5e-2)  # bf16 matmul vs fp32
