"""Triton BK resolvent scan (forward and reverse-scan backward) vs the torch reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before triton
decorates a kernel, and other test modules may already have imported triton in this process). bfloat16 runs only
on a GPU: the interpreter truncates bfloat16 casts instead of rounding them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import torch
from triton.runtime.interpreter import InterpretedFunction
from models.layers.bk_mixer import BKMixer, resolvent_diagonal
from models.layers.bk_mixer_triton import _bk_backward_kernel, _bk_forward_kernel, resolvent_scan_pairs

def err(a, b):
    return (a - b).abs().max().item()

def inputs(n, channels, with_g0, resets, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, n, channels, dtype=torch.float64, generator=g) * 2
    d = torch.complex(a, -(torch.rand(2, n, channels, dtype=torch.float64, generator=g) * 3 + 0.3))
    k = torch.rand(2, n, channels, dtype=torch.float64, generator=g) * 2
    if resets:  # document starts: the coupling to the previous token is zero
        k[0, n // 2] = 0.0
        k[1, 0] = 0.0
    g0 = torch.complex(torch.randn(2, channels, dtype=torch.float64, generator=g),
                       torch.rand(2, channels, dtype=torch.float64, generator=g)) if with_g0 else None
    w = torch.randn(2, n, channels, 2, dtype=torch.float64, generator=g)
    return d, k, g0, w

def case(n, channels, with_g0, resets, dtype):
    d, k, g0, w = inputs(n, channels, with_g0, resets, n * 1000 + channels)
    pairs = [torch.view_as_real(d).to(dtype), k.to(dtype), None if g0 is None else torch.view_as_real(g0).to(dtype)]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in pairs]
    out = resolvent_scan_pairs(*leaves)
    grads = torch.autograd.grad((out * w.to(dtype)).sum(), [t for t in leaves if t is not None])
    # reference: the torch continued fraction on the same (rounded) inputs, in float32 at least
    ref_dtype = torch.promote_types(dtype, torch.float32)
    ref_leaves = [None if t is None else t.detach().to(ref_dtype).requires_grad_() for t in pairs]
    cplx = lambda t: None if t is None else torch.view_as_complex(t)
    ref = torch.view_as_real(resolvent_diagonal(cplx(ref_leaves[0]), ref_leaves[1], cplx(ref_leaves[2]),
                                                method="sequential"))
    used = [t for t in ref_leaves if t is not None]  # k is unused when n = 1 and there is no g0
    ref_grads = torch.autograd.grad((ref * w.to(ref_dtype)).sum(), used, allow_unused=True)
    ref_grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(used, ref_grads)]
    return {"case": f"n={n} C={channels} g0={with_g0} resets={resets} {dtype}", "dtype": str(dtype),
            "shape_ok": out.shape == ref.shape and out.dtype == dtype,
            "g": err(out.to(ref_dtype), ref), "g_scale": ref.abs().max().item(),
            "grads": [err(a.to(ref_dtype), b) for a, b in zip(grads, ref_grads)],
            "grad_scale": max(b.abs().max().item() for b in ref_grads)}

out = {"interpreted": isinstance(_bk_forward_kernel, InterpretedFunction)
       and isinstance(_bk_backward_kernel, InterpretedFunction), "cases": []}
for n in (1, 2, 37):
    for channels, with_g0, resets in ((5, True, False), (70, False, True), (3, True, True)):  # 70: 2 tiles, 1 partial
        out["cases"].append(case(n, channels, with_g0, resets, torch.float64))
    out["cases"].append(case(n, 5, True, True, torch.float32))
    out["cases"].append(case(n, 5, True, True, torch.float16))

d, k, g0, _ = inputs(6, 3, True, True, 0)
args = (torch.view_as_real(d).requires_grad_(), k.requires_grad_(), torch.view_as_real(g0).requires_grad_())
out["gradcheck"] = torch.autograd.gradcheck(resolvent_scan_pairs, args, raise_exception=False)

# the layer: backend "triton" against "torch" (parallel and sequential), with carried state and a decay
layer = {}
for backend, method in (("triton", "parallel"), ("torch", "parallel"), ("torch", "sequential")):
    torch.manual_seed(0)  # the same weights for every backend
    m = BKMixer(8, eta=0.5, chunk_size=4, method=method, backend=backend).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    decay = torch.rand(2, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = torch.complex(torch.zeros(2, 8, dtype=torch.float64), torch.full((2, 8), 0.3, dtype=torch.float64))
    y, last = m(x, state=state, decay=decay, return_state=True)
    (y.square().sum() + last.abs().sum()).backward()
    layer[(backend, method)] = [y.detach(), last.detach(), m.in_proj.weight.grad, m.out_proj.weight.grad]
    assert m.scan_method(x) == ("triton" if backend == "triton" else method)
ref = layer[("torch", "sequential")]
out["layer"] = [max(err(a, b) for a, b in zip(layer[key], ref)) for key in layer]
print("RESULT" + json.dumps(out))
"""


def test_triton_bk_scan_matches_torch_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["interpreted"]  # the kernels really ran in the Triton interpreter
    assert len(result["cases"]) == 15
    tols = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.float16": 2e-2}  # fp16: rounding of stored g
    for c in result["cases"]:
        assert c["shape_ok"], c
        tol = tols[c["dtype"]]
        assert c["g"] <= tol * max(1.0, c["g_scale"]), c
        assert all(e <= 10 * tol * max(1.0, c["grad_scale"]) for e in c["grads"]), c
    assert result["gradcheck"]
    assert all(e <= 1e-12 for e in result["layer"]), result["layer"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton BK kernels on a GPU)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 255, 4097])
def test_triton_bk_scan_on_cuda(n, dtype):
    from models.layers.bk_mixer import resolvent_diagonal
    from models.layers.bk_mixer_triton import resolvent_scan_pairs

    gen = torch.Generator(device="cuda").manual_seed(n)
    shape = (3, n, 70)
    d = torch.complex(torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen),
                      -(torch.rand(shape, device="cuda", dtype=torch.float64, generator=gen) + 0.3))
    k = torch.rand(shape, device="cuda", dtype=torch.float64, generator=gen)
    k[:, n // 2] = 0.0  # a document reset
    w = torch.randn(*shape, 2, device="cuda", dtype=torch.float64, generator=gen)
    pairs = [torch.view_as_real(d).to(dtype).requires_grad_(), k.to(dtype).requires_grad_()]
    out = resolvent_scan_pairs(*pairs)
    grads = torch.autograd.grad((out * w.to(dtype)).sum(), pairs)
    ref_in = [p.detach().double().requires_grad_() for p in pairs]
    ref = torch.view_as_real(resolvent_diagonal(torch.view_as_complex(ref_in[0]), ref_in[1], method="sequential"))
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= tol * max(1.0, scale)
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max().item() <= 10 * tol * max(1.0, b.abs().max().item())
