"""4-bit NF4/FP4 quantization: tables, codes vs a loop reference, packing, error bounds, storage, QLoRA."""

import importlib.util
import io
import math

import pytest
import torch
from torch import nn

from models import quant as q
from models.adapters.lora import LoRAAdapter, LoRALinear, inject_lora, load_lora, merge_and_unload, save_lora
from models.quant import (
    FP4_TABLE,
    NF4_TABLE,
    Linear4bit,
    dequantize_4bit,
    dequantize_model,
    dynamic_map_8bit,
    encode_4bit,
    linear4bit,
    linear_weight_report,
    pack_4bit,
    quantize_4bit,
    quantize_model,
    quantized_storage_bytes,
    unpack_4bit,
)
from models.vision.vit import create_vit

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

# Typed in from QLoRA / bitsandbytes (the NF4 list of the paper's code, index 0..15).
REF_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def ref_fp4() -> list[float]:
    """bitsandbytes FP4 from its bit layout: sign | e1 e0 | m, exponent bias 3 (+1), subnormal 0.0625."""
    values = []
    for code in range(16):
        sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
        mag = (0.0625 * man) if exp == 0 else 2.0 ** (-exp + 4) * (1.5 if man else 1.0)
        values.append((-1.0 if sign else 1.0) * mag / 12.0)
    return values


def ref_codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest-value search with explicit loops (first index wins ties); FP4 takes the sign bit from x."""
    table = REF_NF4 if quant_type == "nf4" else ref_fp4()
    out = []
    for v in x.reshape(-1).tolist():
        if quant_type == "nf4":
            cands, target, base = range(16), v, 0
        else:
            cands, target, base = range(8), abs(v), (8 if v < 0 else 0)
        best, best_d = None, math.inf
        for j in cands:
            d = abs(target - table[j])
            if d < best_d:
                best, best_d = j, d
        out.append(base + best)
    return torch.tensor(out, dtype=torch.uint8)


def ref_quantize(w: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference blockwise quantization written with loops: (packed bytes, absmax per block)."""
    flat = w.float().reshape(-1).tolist()
    flat += [0.0] * (-len(flat) % block_size)
    codes, absmaxes = [], []
    for start in range(0, len(flat), block_size):
        block = flat[start : start + block_size]
        a = max(abs(v) for v in block)
        absmaxes.append(a)
        scaled = torch.tensor(block, dtype=torch.float32) * (1.0 / a if a > 0 else 0.0)
        codes += ref_codes(scaled, quant_type).tolist()
    packed = [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]
    return torch.tensor(packed, dtype=torch.uint8), torch.tensor(absmaxes, dtype=torch.float32)


def tiny_vit(depth: int | None = 2) -> nn.Module:
    """The issue's tiny ViT; ``depth=None`` keeps all 12 blocks (2 by default keeps the tests fast)."""
    torch.manual_seed(0)
    extra = {} if depth is None else {"depth": depth}
    return create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, **extra)


def test_code_tables_equal_bitsandbytes_values():
    assert len(NF4_TABLE) == len(FP4_TABLE) == 16
    assert list(NF4_TABLE) == REF_NF4
    assert torch.equal(torch.tensor(FP4_TABLE), torch.tensor(ref_fp4()))  # equal at float32
    assert math.copysign(1.0, FP4_TABLE[8]) == -1.0  # code 8 is -0
    dmap = dynamic_map_8bit()
    assert dmap.numel() == 256 and torch.all(dmap[1:] > dmap[:-1])
    assert dmap[-1] == 1.0 and 0.0 in dmap.tolist() and dmap.min() > -1.0  # bitsandbytes' signed map


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_match_loop_reference(quant_type):
    torch.manual_seed(1)
    table = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE)
    mids = (table.sort().values[1:] + table.sort().values[:-1]) / 2
    x = torch.cat([torch.rand(1500) * 2 - 1, table, torch.tensor([-1e-9, 1e-9, 0.0]), mids + 1e-6, mids - 1e-6])
    assert torch.equal(encode_4bit(x, quant_type), ref_codes(x, quant_type))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_matches_loop_reference(quant_type):
    torch.manual_seed(2)
    w = torch.randn(9, 23) * 0.05  # 207 values: not a multiple of the block size
    w[0, :5] = 0.0
    state = quantize_4bit(w, quant_type, block_size=32)
    packed, absmax = ref_quantize(w, quant_type, 32)
    assert torch.equal(state.packed, packed)
    assert torch.equal(state.absmax, absmax)
    table = torch.tensor(REF_NF4 if quant_type == "nf4" else ref_fp4())
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()
    expected = (table[codes].view(-1, 32) * absmax[:, None]).reshape(-1)[: w.numel()].view_as(w)
    torch.testing.assert_close(dequantize_4bit(state), expected, rtol=0, atol=0)


def test_nibble_packing_order():
    codes = torch.tensor([1, 2, 3, 4, 15, 0], dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.tolist() == [0x12, 0x34, 0xF0]  # first element in the high nibble
    assert torch.equal(unpack_4bit(packed), codes)
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # NF4 codes 0 and 15
    assert quantize_4bit(w, "nf4").packed[0].item() == 0x0F
    with pytest.raises(ValueError, match="even"):
        pack_4bit(codes[:5])


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_bound(quant_type, double_quant):
    """Per block, |w - deq| / absmax <= half the largest gap between neighbouring table values
    (plus, with double quantization, the measured relative error of the 8-bit absmax)."""
    torch.manual_seed(3)
    bs = 64
    w = torch.randn(300, 77) * (0.5 + torch.rand(300, 1))  # 23100 values, rows with different scales
    state = quantize_4bit(w, quant_type, bs, double_quant=double_quant)
    deq = dequantize_4bit(state)
    assert deq.shape == w.shape and torch.isfinite(deq).all()
    pad = -w.numel() % bs
    blocks = torch.cat([w.reshape(-1), torch.zeros(pad)]).view(-1, bs)
    err = torch.cat([(w - deq).reshape(-1).abs(), torch.zeros(pad)]).view(-1, bs).amax(1)
    absmax = blocks.abs().amax(1)
    table = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE).sort().values
    half_gap = (table[1:] - table[:-1]).max().item() / 2
    absmax_err = torch.zeros_like(absmax)
    if double_quant:  # |w - c a'| <= |w - c a| + |c| |a - a'|, and |c| <= 1
        absmax_deq = q.dequantize_absmax(state.absmax_q, state.absmax_scale, state.absmax_offset)
        absmax_err = (absmax_deq - absmax).abs()
        assert (absmax_err / absmax).max() < 0.02  # 8-bit dynamic map: about 1% of absmax at worst
    assert torch.all(err <= half_gap * absmax + absmax_err + 1e-6)
    rel = (err / absmax).max().item()
    assert rel > 0.5 * half_gap  # the bound is not vacuous: some value sits near a mid-point
    # mean error is well below the worst case
    assert (w - deq).abs().mean() < 0.1 * absmax.mean()


def test_double_quant_layout_and_bits_per_param():
    torch.manual_seed(4)
    w = torch.randn(512, 512)
    plain, dq = quantize_4bit(w, "nf4"), quantize_4bit(w, "nf4", double_quant=True)
    n_blocks = w.numel() // 64
    assert dq.absmax is None and dq.absmax_q.dtype == torch.uint8 and dq.absmax_q.numel() == n_blocks
    assert dq.absmax_scale.numel() == n_blocks // 256 and dq.absmax_offset.dim() == 0
    torch.testing.assert_close(dq.absmax_offset, plain.absmax.mean())
    assert dq.nbytes() * 8 / w.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    assert plain.nbytes() * 8 / w.numel() == pytest.approx(4.5)
    # absmax reconstruction equals code * scale + mean with the codes of a nearest search in the map
    dmap = dynamic_map_8bit()
    centered = (plain.absmax - plain.absmax.mean()).view(-1, 256)
    scale = centered.abs().amax(1, keepdim=True)
    ref_q = (centered / scale).unsqueeze(-1).sub(dmap).abs().argmin(-1)
    assert (ref_q.reshape(-1) != dq.absmax_q.long()).float().mean() < 0.01  # ties/rounding only
    torch.testing.assert_close(
        q.dequantize_absmax(dq.absmax_q, dq.absmax_scale, dq.absmax_offset),
        dmap[dq.absmax_q.long()] * dq.absmax_scale.repeat_interleave(256) + dq.absmax_offset,
    )


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_matches_dequantized_weight(double_quant):
    torch.manual_seed(5)
    lin = nn.Linear(70, 30)  # 2100 weights: last block padded
    layer = Linear4bit.from_linear(lin, "nf4", "float32", use_double_quant=double_quant)
    assert (layer.in_features, layer.out_features, layer.quant_type) == (70, 30, "nf4")
    assert layer.compute_dtype == torch.float32 and not hasattr(layer, "weight")
    x = torch.randn(4, 5, 70)
    w = layer.dequantize_weight()
    assert w.shape == (30, 70) and w.dtype == torch.float32
    torch.testing.assert_close(layer(x), x @ w.t() + lin.bias)
    assert (layer(x) - lin(x)).abs().max() < 0.2 * lin.weight.abs().max() * 70 ** 0.5
    bf = Linear4bit.from_linear(lin, "fp4", torch.bfloat16)
    assert bf(x).dtype == torch.float32 and bf(x.half()).dtype == torch.float16
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.bias.requires_grad
    assert layer.storage_bytes() == sum(b.numel() * b.element_size() for b in layer.buffers())


def test_gradcheck_custom_autograd():
    torch.manual_seed(6)
    layer = Linear4bit.from_linear(nn.Linear(13, 7), "nf4", torch.float64, use_double_quant=True)
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize_weight().sum(0).expand(3, 13))
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())


def test_state_dict_round_trip():
    torch.manual_seed(7)
    layer = Linear4bit.from_linear(nn.Linear(100, 20), "fp4", "float32", use_double_quant=True)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = Linear4bit(100, 20, quant_type="fp4", compute_dtype="float32", use_double_quant=True)
    x = torch.randn(2, 100)
    assert not torch.equal(fresh(x), layer(x))
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a layer without double quant has other buffers
        Linear4bit(100, 20, use_double_quant=False).load_state_dict(layer.state_dict())


def qlora_vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    inject_lora(vit, r=2, bias="lora_only")
    for m in vit.modules():
        if isinstance(m, LoRAAdapter):
            nn.init.normal_(m.lora_B, std=0.05)
    quantize_model(vit, compute_dtype="float32")
    return vit


def test_quantized_model_state_dict_and_adapter_file_round_trip(tmp_path):
    src, x = qlora_vit(0), torch.randn(2, 3, 32, 32)
    dst = qlora_vit(1)
    assert not torch.allclose(dst(x), src(x))
    torch.save(src.state_dict(), tmp_path / "full.pt")
    dst.load_state_dict(torch.load(tmp_path / "full.pt"))
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # adapter-only file (shared LoRA core) onto a backbone quantized from the same weights
    save_lora(src, tmp_path / "adapter.safetensors", bias="lora_only")
    other = qlora_vit(2)
    other.load_state_dict({k: v for k, v in src.state_dict().items() if ".adapters." not in k}, strict=False)
    assert not torch.allclose(other(x), src(x))
    load_lora(other, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(other(x), src(x), rtol=0, atol=0)


def test_vit_linear_storage_at_most_0_14_of_fp32():
    vit = tiny_vit(depth=None)
    fp32_bytes = sum(m.weight.numel() * 4 for m in vit.modules() if isinstance(m, nn.Linear))
    assert linear_weight_report(vit)["ratio_vs_fp32"] == pytest.approx(1.0)
    names = quantize_model(vit, "nf4", use_double_quant=True)
    assert len(names) == 4 * len(vit.blocks) and not any(isinstance(m, nn.Linear) for m in vit.modules())
    buffer_bytes = sum(
        b.numel() * b.element_size() for m in vit.modules() if isinstance(m, Linear4bit) for b in m.buffers()
    )
    assert buffer_bytes == quantized_storage_bytes(vit)
    assert buffer_bytes <= 0.14 * fp32_bytes
    report = linear_weight_report(vit)
    assert 4.12 < report["bits_per_param"] < 4.14
    vit_plain = tiny_vit()
    quantize_model(vit_plain, "nf4", use_double_quant=False)
    assert linear_weight_report(vit_plain)["bits_per_param"] == pytest.approx(4.5)


def test_qlora_gradients_only_to_adapters_and_input():
    vit = tiny_vit()
    injected = inject_lora(vit, r=4, lora_alpha=8)
    replaced = quantize_model(vit, "nf4", compute_dtype="float32")
    assert {f"{n}.base" for n in injected} <= set(replaced)
    for layer in vit.modules():
        if isinstance(layer, LoRALinear):
            assert isinstance(layer.base, Linear4bit)
            assert all(p.dtype == torch.float32 for p in layer.adapters.parameters())
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n and n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    # make B non-zero so A gets a gradient as well
    for m in vit.modules():
        if isinstance(m, LoRAAdapter):
            nn.init.normal_(m.lora_B, std=0.01)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    vit(x).pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in vit.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert all(b.grad is None for b in vit.buffers())
    before = {n: b.clone() for n, b in vit.named_buffers()}
    torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(b, before[n]) for n, b in vit.named_buffers())
    with pytest.raises(TypeError, match="dequantize"):
        next(m for m in vit.modules() if isinstance(m, LoRALinear)).merge()


def test_dequantize_model_then_merge_lora():
    vit = tiny_vit().eval()
    inject_lora(vit, r=2)
    for m in vit.modules():
        if isinstance(m, LoRAAdapter):
            nn.init.normal_(m.lora_B, std=0.05)
    quantize_model(vit, compute_dtype="float32")
    x = torch.randn(2, 3, 32, 32)
    expected = vit(x)
    names = dequantize_model(vit)
    assert len(names) == 4 * len(vit.blocks) and not any(isinstance(m, Linear4bit) for m in vit.modules())
    torch.testing.assert_close(vit(x), expected, rtol=1e-5, atol=1e-5)
    merge_and_unload(vit)
    assert not any(isinstance(m, LoRALinear) for m in vit.modules())
    torch.testing.assert_close(vit(x), expected, rtol=1e-4, atol=1e-4)


def test_skip_modules_respected():
    vit = tiny_vit()
    inject_lora(vit, r=2)
    names = quantize_model(vit, skip_modules=["blocks.0.attn.qkv", "fc2", r"blocks\.1\.attn\.proj$"])
    assert isinstance(vit.blocks[0].attn.qkv.base, nn.Linear)  # LoRA base matched by the wrapper's name
    assert isinstance(vit.blocks[1].attn.qkv.base, Linear4bit)
    assert isinstance(vit.blocks[1].attn.proj.base, nn.Linear)
    assert all(isinstance(b.mlp.fc2.base, nn.Linear) and isinstance(b.mlp.fc1.base, Linear4bit) for b in vit.blocks)
    assert "blocks.0.attn.qkv.base" not in names and "blocks.0.attn.proj.base" in names
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(vit, skip_modules=["blocks.0.attn.qkv", "fc2", "blocks.1.attn.proj"])  # nothing left
    with pytest.raises(ValueError, match="skip_modules.*'qkvv'"):
        quantize_model(tiny_vit(), skip_modules=["qkvv"])


def test_head_quantized_unless_skipped():
    torch.manual_seed(8)
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=1)
    assert "head" in quantize_model(model)
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5, depth=1)
    assert "head" not in quantize_model(model, skip_modules=["head"]) and isinstance(model.head, nn.Linear)


def test_option_validation_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="compute_dtype.*'int8'"):
        quantize_model(model, compute_dtype="int8")
    with pytest.raises(ValueError, match="quant_type"):
        quantize_model(model, quant_type="int4")
    with pytest.raises(ValueError, match="mode"):
        quantize_model(model, mode="gptq")
    with pytest.raises(ValueError, match="block_size"):
        quantize_model(model, block_size=63)
    assert isinstance(model[0], nn.Linear)  # nothing replaced by failed calls
    quantize_model(model, compute_dtype="float16", use_double_quant=False, compress_statistics=False)
    assert model[0].compute_dtype == torch.float16 and not model[0].use_double_quant


@pytest.mark.parametrize(("use_double_quant", "compress_statistics", "expected"), [
    (None, None, True), (True, None, True), (False, None, False), (None, False, False), (None, True, True),
    (False, True, True), (True, False, True), (False, False, False),
])
def test_compress_statistics_is_an_alias(use_double_quant, compress_statistics, expected):
    """Neither set: on; one set: its value (use_double_quant: false alone turns it off); both: either true."""
    model = nn.Sequential(nn.Linear(8, 8))
    quantize_model(model, use_double_quant=use_double_quant, compress_statistics=compress_statistics)
    assert model[0].use_double_quant is expected and hasattr(model[0], "weight_absmax_q") is expected
    assert q.resolve_double_quant(use_double_quant, compress_statistics) is expected


@pytest.mark.parametrize("double_quant", [False, True])
def test_dtype_casts_never_touch_the_statistics(double_quant):
    torch.manual_seed(11)
    layer = Linear4bit.from_linear(nn.Linear(70, 30), "nf4", "float32", use_double_quant=double_quant)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    w = layer.dequantize_weight(torch.float32)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                 lambda m: m.to("cpu", torch.float16), lambda m: m.float()):
        cast(layer)
        for n, b in layer.named_buffers():
            assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n  # fp32 stats, uint8 codes
        assert torch.equal(layer.dequantize_weight(torch.float32), w)
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16  # the bias is an ordinary parameter and follows the cast
    assert {b.dtype for n, b in layer.named_buffers() if n != "weight_packed" and n != "weight_absmax_q"} == {
        torch.float32}


def test_compute_dtype_auto_follows_native_bf16(monkeypatch):
    nf4 = q.nf4
    for flags, expected in (({"avx512_bf16", "avx512f"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16),
                            ({"avx512f", "avx2"}, torch.float32), (set(), torch.float32)):
        monkeypatch.setattr(nf4, "_cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(nf4, "_NATIVE_BF16", {})
        assert q.auto_compute_dtype("cpu") == expected
        layer = Linear4bit.from_linear(nn.Linear(16, 4))  # "auto" is the default
        assert layer.compute_dtype_setting == "auto" and layer.compute_dtype == expected
        x = torch.randn(2, 16)
        assert layer(x).dtype == torch.float32
        ref = (x.to(expected) @ layer.dequantize_weight(expected).t() + layer.bias.to(expected)).float()
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    monkeypatch.setattr(nf4, "_NATIVE_BF16", {})
    flags = nf4._cpu_flags()  # this machine: the real answer
    assert q.native_bf16("cpu") == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    with pytest.raises(ValueError, match="'auto'"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), compute_dtype="automatic")


@pytest.mark.parametrize("double_quant", [False, True])
def test_save_dequantized_dequantizes_once_and_gives_identical_gradients(monkeypatch, double_quant):
    torch.manual_seed(12)
    lin = nn.Linear(70, 30)
    grads, calls = {}, {}
    for save in (False, True):
        layer = Linear4bit.from_linear(lin, "nf4", "float32", double_quant, save_dequantized=save)
        count = []
        real = layer.dequantize_weight
        monkeypatch.setattr(layer, "dequantize_weight", lambda *a, real=real, count=count: count.append(1) or real(*a))
        x = torch.randn(4, 70, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = layer(x)
        (y * torch.arange(30.0)).sum().backward()
        grads[save], calls[save] = (y.detach(), x.grad), len(count)
        with torch.no_grad():
            layer(x)  # no backward coming: nothing saved, one dequantization
        assert len(count) == calls[save] + 1
    assert calls == {False: 2, True: 1}
    assert torch.equal(grads[False][0], grads[True][0]) and torch.equal(grads[False][1], grads[True][1])


class _FakeParams4bit(nn.Parameter):
    """Stand-in for ``bitsandbytes.nn.Params4bit``: the attributes the report reads."""

    def __new__(cls, data, blocksize=64, compress_statistics=True, quant_type="nf4"):
        p = super().__new__(cls, data, requires_grad=False)
        p.blocksize, p.compress_statistics, p.quant_type = blocksize, compress_statistics, quant_type
        return p


@pytest.mark.parametrize("double_quant", [False, True])
def test_weight_report_for_hf_layers_counts_the_4bit_format(double_quant):
    """``mode: hf`` layers (bitsandbytes Linear4bit, an nn.Linear subclass): before the move to CUDA the weight
    is still float, after it a packed uint8 (params/2, 1); both must report the 4-bit format."""
    torch.manual_seed(13)
    lin = nn.Linear(300, 70)
    ours = linear_weight_report(nn.Sequential(Linear4bit.from_linear(lin, use_double_quant=double_quant)))
    for data in (lin.weight.detach().clone(), torch.zeros(300 * 70 // 2, 1, dtype=torch.uint8)):
        hf = nn.Linear(300, 70)
        hf.weight = _FakeParams4bit(data, 64, double_quant)
        report = linear_weight_report(nn.Sequential(hf, nn.Linear(10, 10)))
        plain = linear_weight_report(nn.Sequential(nn.Linear(10, 10)))
        assert report["params"] == ours["params"] + 100
        assert report["bytes"] == ours["bytes"] + plain["bytes"]
    assert ours["bits_per_param"] == pytest.approx(4.5 if not double_quant else 4 + 8 / 64 + 32 / (64 * 256), abs=0.02)


def test_multihead_attention_linear_left_alone():
    model = nn.Sequential(nn.Linear(8, 8))
    model.append(nn.MultiheadAttention(8, 2))
    assert quantize_model(model) == ["0"]


def test_cpu_forward_never_uses_triton(monkeypatch):
    def boom():
        raise AssertionError("triton path used on CPU")

    monkeypatch.setattr(linear4bit, "_triton_dequantize", boom)
    layer = Linear4bit.from_linear(nn.Linear(16, 4))
    assert layer(torch.randn(2, 16)).shape == (2, 4)


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed")
def test_hf_mode_without_bitsandbytes_clear_error():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ImportError, match="bitsandbytes.*mode: manual"):
        quantize_model(model, mode="hf")
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_match_bitsandbytes(quant_type):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(9)
    w = torch.randn(64, 128)
    try:
        bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    except (RuntimeError, NotImplementedError) as err:  # builds without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {err}")
    w[0, :8] = 0.0  # exact zeros (and the tiny values near them) exercise the signed-zero codes
    w[1, :8] = torch.tensor([1e-9, -1e-9, 1e-4, -1e-4, 0.0, -0.0, 1e-3, -1e-3])
    packed, bnb_state = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    ours = quantize_4bit(w, quant_type, 64)
    torch.testing.assert_close(bnb_state.absmax.float().cpu(), ours.absmax, rtol=0, atol=0)
    theirs, mine = unpack_4bit(packed.reshape(-1).cpu()).long(), unpack_4bit(ours.packed).long()
    table = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE)
    assert torch.equal(table[theirs], table[mine])  # the same stored value everywhere (+0 == -0) ...
    differ = theirs != mine
    # ... and the same code, except FP4's two zeros: adaptlab follows bitsandbytes' CUDA kernel (+0 / -0 by the
    # sign of the input), its CPU kernel picks the other sign for some inputs.
    signed_zero = {(0, 8), (8, 0)} if quant_type == "fp4" else set()
    assert set(zip(theirs[differ].tolist(), mine[differ].tolist())) <= signed_zero
    assert differ.float().mean() < 0.05
    deq = bnb_f.dequantize_4bit(packed, bnb_state).float().cpu()
    torch.testing.assert_close(deq, dequantize_4bit(ours).float(), rtol=0, atol=0)
