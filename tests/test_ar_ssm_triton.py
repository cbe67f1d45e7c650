"""Triton decayed scan (forward and backward) vs the torch reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` in a subprocess (:func:`tests.triton_helpers.run_interpreted`),
so the variable never reaches other tests.
"""

import pytest
import torch

from tests.triton_helpers import run_interpreted

pytest.importorskip("triton")

SCRIPT = r"""
import json
import torch
from triton.runtime.interpreter import InterpretedFunction
from models.layers.ar_ssm import ARSSM, decayed_scan, decayed_scan_reference
from models.layers.ar_ssm_triton import BLOCK_T, _decayed_scan_kernel, decayed_scan_triton

def err(a, b):
    return (a - b).abs().max().item()

def case(n, rank, with_h0, dtype, block_t):
    g = torch.Generator().manual_seed(n * 100 + rank)
    x = torch.randn(2, n, rank, dtype=torch.float64, generator=g)
    decay = torch.rand(rank, dtype=torch.float64, generator=g) * 0.98 + 0.01
    decay[0], decay[-1] = 1.0, 1e-3  # plain cumulative sum; fast decay
    h0 = torch.randn(2, rank, dtype=torch.float64, generator=g) if with_h0 else None
    w = torch.randn(2, n, rank, dtype=torch.float64, generator=g)
    w_last = torch.randn(2, rank, dtype=torch.float64, generator=g)
    grads, outs = [], []
    for fn in (lambda *a: decayed_scan_triton(*a, block_t=block_t), decayed_scan_reference):
        leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (x, decay, h0) if t is not None]
        h, last = fn(leaves[0], leaves[1], leaves[2] if with_h0 else None)
        ((h * w.to(dtype)).sum() + (last * w_last.to(dtype)).sum()).backward()
        outs.append((h.detach(), last.detach()))
        grads.append([t.grad for t in leaves])
    (h, last), (h_ref, last_ref) = outs
    return {"case": f"n={n} R={rank} h0={with_h0} {dtype} block={block_t}", "dtype": str(dtype),
            "shape_ok": h.shape == h_ref.shape and h.dtype == dtype, "h": err(h, h_ref), "last": err(last, last_ref),
            "grads": [err(a, b) for a, b in zip(*grads)], "scale": h_ref.abs().max().item()}

out = {"interpreted": isinstance(_decayed_scan_kernel, InterpretedFunction), "block": BLOCK_T, "cases": []}
B = 16
for n in (1, B - 1, B, B + 1, 3 * B + 5):
    for rank, with_h0 in ((5, True), (40, False), (40, True)):  # 40 ranks: two rank tiles, the second partial
        out["cases"].append(case(n, rank, with_h0, torch.float64, B))
    out["cases"].append(case(n, 5, True, torch.float32, B))
out["cases"].append(case(3 * BLOCK_T + 5, 3, True, torch.float64, BLOCK_T))  # the default block size

g = torch.Generator().manual_seed(0)
inputs = (torch.randn(2, 7, 3, dtype=torch.float64, generator=g).requires_grad_(),
          torch.tensor([0.4, 0.9, 1.0], dtype=torch.float64).requires_grad_(),
          torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_())
out["gradcheck"] = torch.autograd.gradcheck(lambda a, b, c: decayed_scan_triton(a, b, c, block_t=4), inputs,
                                            raise_exception=False)

# the fused layer kernel's own backward (uv read with a wider token stride, logits, decay logit, h0; through y, g
# and h) by finite differences
from models.layers.ar_ssm_triton import ar_ssm_triton
g = torch.Generator().manual_seed(1)
wide = torch.randn(2, 7, 9, dtype=torch.float64, generator=g).requires_grad_()
inputs = (wide, torch.randn(2, 7, 3, dtype=torch.float64, generator=g).requires_grad_(),
          torch.randn(3, dtype=torch.float64, generator=g).requires_grad_(),
          torch.randn(2, 3, dtype=torch.float64, generator=g).requires_grad_())
scale = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
out["layer_gradcheck"] = torch.autograd.gradcheck(
    lambda w, lg, th, h0: ar_ssm_triton(w[..., 3:], lg, th, from_logit=True, scale=scale, h0=h0, block_t=4)[:3],
    inputs, raise_exception=False, fast_mode=True)

# the layer on the fused path (backend "triton": conv1d, one projection, the kernel around the scan, the gate
# statistics kernel) == backend "torch", streamed in two calls with the carried state (both convolution forms and
# an initial scan state), with the gate L1 loss; training with the rank curriculum, a fixed decay, eval with
# pruned ranks (index_select) and with multiplied gates; odd lengths; fp64 / fp32 / fp16
def layer_case(n, dtype, mode):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 8, dtype=torch.float64, generator=gen).to(dtype)
    w = torch.randn(2, n, 8, dtype=torch.float64, generator=gen)
    cut = (n + 1) // 2
    res = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        m = ARSSM(8, max_rank=6, min_rank=2, gate_hidden=4, backend=backend, decay=0.9 if mode == "fixed" else None,
                  prune_inference=mode != "eval_scaled").to(dtype)
        if mode == "curriculum":
            m.set_active_rank(4)
        if mode.startswith("eval"):
            m.gate_running_max[[1, 4]] = 0.0
            m.eval()
        xl = x.clone().requires_grad_()
        y1, st = m(xl[:, :cut], return_state=True)
        y2, st2 = m(xl[:, cut:], st, return_state=True)
        y = torch.cat([y1, y2], 1).double()
        loss = (y * w).sum() + st2.scan.double().square().sum() + 100 * m.gate_l1_loss().double()
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [xl, *params], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip([xl, *params], grads)]
        res.append([y, st2.scan, st2.conv, *grads, m.gate_running_max, m.gate_updates.double(), m._last_gate])
    return {"case": f"layer n={n} {dtype} {mode}", "dtype": str(dtype),
            "errors": [err(a.double(), b.double()) / max(1.0, b.abs().max().item()) for a, b in zip(*res)]}

out["layer"] = [layer_case(n, torch.float64, mode) for n in (2, 37) for mode in
                ("train", "curriculum", "fixed", "eval_pruned", "eval_scaled")]
out["layer"] += [layer_case(37, dtype, "train") for dtype in (torch.float32, torch.float16)]
print("RESULT" + json.dumps(out))
"""


def test_triton_scan_matches_torch_under_interpreter():
    result = run_interpreted(SCRIPT)
    assert result["interpreted"]  # the kernel really ran in the Triton interpreter
    assert len(result["cases"]) == 21
    for c in result["cases"]:
        assert c["shape_ok"], c
        # float64: the same recurrence up to rounding; float32: vs the float32 reference
        tol = 1e-11 if c["dtype"] == "torch.float64" else 1e-5
        assert c["h"] <= tol * max(1.0, c["scale"]) and c["last"] <= tol * max(1.0, c["scale"]), c
        assert all(e <= tol * 1e2 * max(1.0, c["scale"]) for e in c["grads"]), c
    assert result["gradcheck"] and result["layer_gradcheck"]
    assert len(result["layer"]) == 12
    tols = {"torch.float64": 1e-9, "torch.float32": 1e-5, "torch.float16": 1e-2}  # fp16: u and v rounded first
    for c in result["layer"]:
        assert all(e <= tols[c["dtype"]] for e in c["errors"]), c


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 63, 64, 65, 197, 4100])
def test_triton_scan_on_cuda(n):
    from models.layers.ar_ssm import decayed_scan
    from models.layers.ar_ssm_triton import decayed_scan_triton

    torch.manual_seed(n)
    x = torch.randn(3, n, 37, device="cuda", dtype=torch.float64, requires_grad=True)
    decay = (torch.rand(37, device="cuda", dtype=torch.float64) * 0.99 + 0.01).requires_grad_()
    h0 = torch.randn(3, 37, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, n, 37, device="cuda", dtype=torch.float64)
    grads = []
    for fn in (decayed_scan_triton, decayed_scan):
        h, _ = fn(x, decay, h0)
        grads.append((h, *torch.autograd.grad((h * w).sum(), [x, decay, h0])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
