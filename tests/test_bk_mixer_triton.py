"""Triton BK resolvent scan (forward and reverse-scan backward) vs the torch reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess (:func:`tests.triton_helpers.run_interpreted`).
bfloat16 runs only on a GPU: the interpreter truncates bfloat16 casts instead of rounding them.
"""

import pytest
import torch

from tests.triton_helpers import run_interpreted

pytest.importorskip("triton")

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

# the layer: the fused mixer (backend "triton": one kernel between the projections) against the torch path,
# with resets, a decay, a carried state and gradients through the feature and g; odd lengths; fp64/fp32/fp16
def mixer_case(n, dtype, resets, with_decay, with_g0):
    gen = torch.Generator().manual_seed(n)
    real = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, n, 8, dtype=torch.float64, generator=gen).to(dtype)
    decay = torch.rand(2, n, 8, dtype=torch.float64, generator=gen).to(real) if with_decay else None
    g0 = torch.complex(torch.randn(2, 8, dtype=real, generator=gen) * 0.3, torch.rand(2, 8, dtype=real, generator=gen))
    reset = None
    if resets:
        reset = torch.zeros(2, n, dtype=torch.bool)
        reset[0, n // 2], reset[1, 0] = True, True
    w = torch.randn(2, n, 8, dtype=torch.float64, generator=gen)
    wg = torch.randn(2, n, 8, 2, dtype=torch.float64, generator=gen)
    res = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)  # the same weights for both
        m = BKMixer(8, eta=0.5, chunk_size=4, backend=backend).to(dtype)
        leaves = [t.detach().clone().requires_grad_() for t in (x, decay, g0 if with_g0 else None) if t is not None]
        y, g = m.mix(leaves[0], leaves[-1] if with_g0 else None,
                     leaves[1] if with_decay else None, reset)
        loss = (y.to(real) * w.to(real)).sum() + (torch.view_as_real(g) * wg.to(real)).sum()
        grads = torch.autograd.grad(loss, [*leaves, m.in_proj.weight, m.out_proj.weight])
        stats = m.stats()
        res[backend] = ([y.detach().to(real), torch.view_as_real(g).detach(), *(t.to(real) for t in grads)],
                        [stats[key].item() for key in ("max_abs_g", "bound", "transfer_condition", "stable")])
    (got, got_stats), (ref, ref_stats) = res["triton"], res["torch"]
    return {"case": f"n={n} {dtype} resets={resets} decay={with_decay} g0={with_g0}", "dtype": str(dtype),
            "errors": [err(a, b) / max(1.0, b.abs().max().item()) for a, b in zip(got, ref)],
            "stats": got_stats, "ref_stats": ref_stats}

out["mixer"] = [mixer_case(n, torch.float64, resets, decay, g0) for n in (1, 37) for resets, decay, g0 in
                ((True, True, True), (False, False, False), (True, False, True))]
out["mixer"] += [mixer_case(37, dtype, True, True, True) for dtype in (torch.float32, torch.float16)]
torch.manual_seed(0)
m = BKMixer(8, eta=0.5, chunk_size=4, backend="triton").double()
x = torch.randn(2, 11, 8, dtype=torch.float64)
out["scan_method"] = m.scan_method(x)
y, last = m(x, return_state=True)
# the fused mixer's own backward (projection, decay, g0; through the feature and g) by finite differences
from models.layers.bk_mixer_triton import bk_mixer_triton
gen = torch.Generator().manual_seed(5)
reset = torch.zeros(2, 6, dtype=torch.bool)
reset[0, 3] = True
args = (torch.randn(2, 6, 9, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.rand(2, 6, 3, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.complex(torch.randn(2, 3, dtype=torch.float64, generator=gen),
                      torch.rand(2, 3, dtype=torch.float64, generator=gen)).requires_grad_())
out["mixer_gradcheck"] = torch.autograd.gradcheck(
    lambda p, dec, g0: (lambda f, g, _: (f, torch.view_as_real(g)))(*bk_mixer_triton(p, 0.7, dec, g0, reset)), args,
    raise_exception=False, fast_mode=True)
try:  # a carried state of the wrong precision is refused, not reinterpreted
    bk_mixer_triton(torch.randn(2, 6, 9), 0.7, g0=torch.zeros(2, 3, dtype=torch.complex128))
    out["g0_refused"] = False
except ValueError:
    out["g0_refused"] = True
out["forward_is_mix"] = err(y, m.mix(x)[0]) == 0 and err(last, m.mix(x)[1][:, -1]) == 0
print("RESULT" + json.dumps(out))
"""


def test_triton_bk_scan_matches_torch_under_interpreter():
    result = run_interpreted(SCRIPT)
    assert result["interpreted"]  # the kernels really ran in the Triton interpreter
    assert len(result["cases"]) == 15
    tols = {"torch.float64": 1e-12, "torch.float32": 1e-5, "torch.float16": 2e-2}  # fp16: rounding of stored g
    for c in result["cases"]:
        assert c["shape_ok"], c
        tol = tols[c["dtype"]]
        assert c["g"] <= tol * max(1.0, c["g_scale"]), c
        assert all(e <= 10 * tol * max(1.0, c["grad_scale"]) for e in c["grads"]), c
    assert result["gradcheck"]
    assert len(result["mixer"]) == 8 and result["scan_method"] == "triton" and result["forward_is_mix"]
    assert result["mixer_gradcheck"] and result["g0_refused"]
    for c in result["mixer"]:  # y, g, then the gradients of x, decay, g0, W_in, W_out
        tol = tols[c["dtype"]]
        assert all(e <= 10 * tol for e in c["errors"]), c
        assert c["stats"][3] == c["ref_stats"][3] == 1.0, c  # stable
        for a, b in zip(c["stats"][:3], c["ref_stats"][:3]):  # max |g|, bound, condition (inf: a reset's k = 0)
            assert a == b or abs(a - b) <= 1e-5 * max(1.0, abs(b)), c


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
