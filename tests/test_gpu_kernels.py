"""CUDA only (marker ``gpu``, skipped without CUDA; ``bash benchmarks/gpu/check.sh`` runs them): every Triton kernel
compiled for real and equal to its torch reference in fp32 / fp16 / bf16, ``Linear4bit`` forward/backward in bf16,
and ``mode: hf`` against bitsandbytes' CUDA kernels.

On the CPU the same kernels are checked under ``TRITON_INTERPRET=1`` (``test_quantization_triton.py``,
``test_ar_ssm_triton.py``), which cannot check bf16: the interpreter truncates fp32 -> bf16 casts instead of
rounding. Tolerances: a dtype's rounding is compared with a float64 reference (norm-wise relative error) and the
kernel must be as close as torch's own computation in that dtype, or within a bound set by the dtype's unit
roundoff; element-wise dequantization without double quantization is bit-exact.
"""

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
triton = pytest.importorskip("triton")

from models import quant as q  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: unit roundoff of each dtype (half an ulp at 1)
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
CUDA = torch.device("cuda")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error against a float64 reference; NaN/inf never pass."""
    a = a.double()
    assert torch.isfinite(a).all()
    return ((a - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_kernel_equals_torch_reference(quant_type, double_quant, dtype):
    from models.quant.triton_dequant import dequantize_4bit_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, block in (((37, 29), 64), ((300, 70), 64), ((8, 50), 32), ((1024, 1536), 64)):
        state = q.quantize_4bit(torch.randn(*shape, device=CUDA, generator=g) * 0.1, quant_type, block, double_quant)
        ref = q.dequantize_4bit(state, dtype)
        got = dequantize_4bit_triton(state, dtype)
        assert got.dtype == dtype and got.shape == ref.shape and got.is_cuda
        if not double_quant:  # one fp32 product, one rounding: bit for bit
            assert torch.equal(got, ref), (shape, block)
        else:  # absmax = code * scale + offset may be fused into one FMA by the compiler: a few fp32 ulps
            bound = 4 * 2.0**-24 + (0.0 if dtype == torch.float32 else 2 * UNIT[dtype])
            err = ((got.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30))
            assert err.max().item() <= bound, (shape, block, err.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transpose", [True, False], ids=["forward", "input_grad"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_fused_dequant_matmul_kernel_equals_torch_matmul(double_quant, transpose, dtype):
    from models.quant.triton_dequant import matmul_4bit_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    for (n_out, n_in), lead in (((70, 45), (2, 19)), ((384, 1536), (300,)), ((1152, 384), (4, 97))):
        state = q.quantize_4bit(torch.randn(n_out, n_in, device=CUDA, generator=g) * 0.1, "nf4", 64, double_quant)
        k = n_in if transpose else n_out
        a = torch.randn(*lead, k, device=CUDA, generator=g).to(dtype)
        w = q.dequantize_4bit(state, dtype)
        w = w.t() if transpose else w
        ref = a.double() @ w.double()
        got = matmul_4bit_triton(a, state, transpose=transpose)
        assert got.dtype == dtype and got.shape == (*lead, w.shape[1])
        torch_err = rel(a @ w, ref)
        floor = 1e-6 if dtype == torch.float32 else 2 * UNIT[dtype]
        assert rel(got, ref) <= max(2 * torch_err, floor), (n_out, n_in, rel(got, ref), torch_err)


@pytest.mark.parametrize("save_dequantized", [False, True])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_linear4bit_forward_backward_bf16(double_quant, save_dequantized):
    torch.manual_seed(0)
    dense = nn.Linear(384, 1152).cuda()
    layer = q.Linear4bit.from_linear(dense, "nf4", "bfloat16", double_quant, save_dequantized=save_dequantized)
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, 50, 384, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    w = layer.dequantize_weight(torch.float64)  # the 4-bit weight, exactly
    ref_y = x.detach().double() @ w.t() + layer.bias.double()
    ref_gx = grad.double() @ w
    # one bf16 matmul in torch for scale: the kernel path must be as accurate
    torch_y = x.detach() @ w.to(torch.bfloat16).t() + layer.bias.to(torch.bfloat16)
    assert rel(y, ref_y) <= max(2 * rel(torch_y, ref_y), 2 * UNIT[torch.bfloat16])
    assert rel(x.grad, ref_gx) <= max(2 * rel(grad @ w.to(torch.bfloat16), ref_gx), 2 * UNIT[torch.bfloat16])
    torch.testing.assert_close(layer.bias.grad.double(), grad.double().sum((0, 1)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ar_ssm_scan_kernel_forward_backward_equal_reference(dtype):
    from models.layers.ar_ssm import decayed_scan_reference
    from models.layers.ar_ssm_triton import BLOCK_T, decayed_scan_triton

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, rank, with_h0 in ((1, 5, True), (BLOCK_T + 1, 40, False), (3 * BLOCK_T + 5, 40, True), (1000, 64, True)):
        x = torch.randn(2, n, rank, device=CUDA, generator=g).to(dtype)
        decay = (torch.rand(rank, device=CUDA, generator=g) * 0.98 + 0.01).to(dtype)
        if dtype != torch.float16:  # a plain cumulative sum (its decay gradient overflows fp16's range)
            decay[0] = 1.0
        h0 = torch.randn(2, rank, device=CUDA, generator=g).to(dtype) if with_h0 else None
        w = torch.randn(2, n, rank, device=CUDA, generator=g, dtype=torch.float64)
        grads = []
        outs = []
        for fn, cast in ((decayed_scan_triton, dtype), (decayed_scan_reference, torch.float64)):
            leaves = [t.detach().to(cast).requires_grad_() for t in (x, decay, h0) if t is not None]
            h, last = fn(leaves[0], leaves[1], leaves[2] if with_h0 else None)
            ((h.double() * w).sum() + last.double().sum()).backward()
            outs.append(h.detach())
            grads.append([t.grad for t in leaves])
        h, h_ref = outs
        assert h.dtype == dtype
        assert rel(h, h_ref) <= tol, (n, rank, rel(h, h_ref))
        for got, ref in zip(*grads):
            assert got.dtype == dtype and rel(got, ref) <= tol, (n, rank, rel(got, ref))


# ------------------------------------------------------------------------------------------- mode: hf (bitsandbytes)
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_nf4_codes_and_dequantization_equal_bitsandbytes_cuda(double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(256, 384, device=CUDA) * 0.05
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ours = q.quantize_4bit(w, "nf4", 64, double_quant)
    codes_bnb = q.unpack_4bit(packed.flatten())[: w.numel()]
    codes_ours = q.unpack_4bit(ours.packed)[: w.numel()]
    same = (codes_bnb == codes_ours).float().mean().item()
    assert same >= 0.999, same  # ties at a table midpoint may round differently in fp32; nothing else
    deq_bnb = bnb_f.dequantize_4bit(packed, state).float()
    deq_ours = q.dequantize_4bit(ours, torch.float32)
    assert rel(deq_ours, deq_bnb.double()) <= 1e-3


def test_mode_hf_model_runs_bitsandbytes_kernels_and_matches_manual_mode():
    bnb = pytest.importorskip("bitsandbytes")
    from models.adapters.lora import inject_lora

    def build(mode):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(384, 768), nn.GELU(), nn.Linear(768, 384))
        inject_lora(model, target_modules=["0", "2"], r=4, lora_alpha=8)  # LoRA first, as the TrackNet QLoRA
        q.quantize_model(model, "nf4", "bfloat16", use_double_quant=True, mode=mode)
        return model.cuda()

    hf, manual = build("hf"), build("manual")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in hf.modules()) == 2
    assert all(m.weight.quant_state is not None for m in hf.modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(8, 384, device=CUDA)
    outs = []
    for model in (hf, manual):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02, generator=torch.Generator(device="cuda").manual_seed(3))
        y = model(x)
        y.float().square().mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() for g in grads)
        outs.append((y.detach().double(), grads))
    (y_hf, g_hf), (y_manual, g_manual) = outs
    assert rel(y_hf, y_manual) <= 2e-2  # same 4-bit weights, bf16 compute on both sides
    for a, b in zip(g_hf, g_manual):
        assert a.shape == b.shape and rel(a, b.double()) <= 5e-2
