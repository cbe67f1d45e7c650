"""LNS linear: encode/decode exactness and error bound, the k-reduction (exact on powers of two, chunked),
the per-product error bound, a per-product reference, training = F.linear, eval weight cache, zeros."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.quant.lns import (
    LNS_FORMATS,
    LNSLinear,
    lns_decode,
    lns_encode,
    lns_matmul,
    lns_scale_exponent,
    lns_zero_code,
)

FORMATS = list(LNS_FORMATS.values())
IDS = list(LNS_FORMATS)


def signed_powers_of_two(shape, spread: int, generator: torch.Generator, zeros: bool = True) -> torch.Tensor:
    """Entries +-2^m, m in [-spread // 2, spread - spread // 2], about 10 % zeros."""
    m = torch.randint(-(spread // 2), spread - spread // 2 + 1, shape, generator=generator)
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    x = sign * torch.exp2(m.float())
    if zeros:
        x[torch.rand(shape, generator=generator) < 0.1] = 0
    return x


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_encode_decode_exact_on_powers_of_two(fmt):
    g = torch.Generator().manual_seed(0)
    x = signed_powers_of_two((16, 40), min(6, int(fmt.octaves)), g)
    bias = lns_scale_exponent(x, fmt.gamma, dim=1)
    sign, e = lns_encode(x, *fmt, bias)
    assert sign.dtype == torch.int8 and e.dtype == torch.int32
    assert ((e == lns_zero_code(fmt.exp_bits)) == (x == 0)).all()
    valid = e[x != 0]
    assert valid.min() >= -(2**fmt.exp_bits - 2) and valid.max() <= 0
    assert torch.equal(lns_decode(sign, e, *fmt, bias), x)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_rounding_error_bound_in_range(fmt):
    """|decode(encode(x)) / x - 1| <= 2^(1 / (2 gamma)) - 1 for every x inside the format's range, and the
    bound is nearly reached (the rounding is to the nearest 1/gamma of an octave, not coarser or finer)."""
    g = torch.Generator().manual_seed(1)
    octaves = torch.rand(20000, generator=g, dtype=torch.float64) * (fmt.octaves - 1)
    x = torch.exp2(-octaves) * (torch.randint(0, 2, (20000,), generator=g) * 2 - 1)
    sign, e = lns_encode(x, *fmt)  # bias 0: range (2^-octaves, 1]
    rel = (lns_decode(sign, e, *fmt).double() / x - 1).abs()
    bound = fmt.rel_error_bound
    assert rel.max() <= bound * (1 + 1e-5) + 1e-7
    assert rel.max() >= 0.9 * bound


def test_zero_underflow_and_saturation():
    fmt = LNS_FORMATS["lns4-g2"]  # exponents -6..0, smallest magnitude 2^-3
    x = torch.tensor([0.0, -0.0, 2.0**-3, 2.0**-3 * 0.6, 2.0**-3 * 0.4, 5.0, -5.0])
    sign, e = lns_encode(x, *fmt)
    zero = lns_zero_code(fmt.exp_bits)
    assert e.tolist() == [zero, zero, -6, -6, zero, 0, 0]  # 0.6 x smallest rounds up, 0.4 x to zero; 5 saturates
    assert lns_decode(sign, e, *fmt).tolist() == [0.0, 0.0, 0.125, 0.125, 0.0, 1.0, -1.0]
    # an all-zero row has scale exponent 0 and decodes to zeros; zero rows/columns give zero outputs
    assert lns_scale_exponent(torch.zeros(2, 3), 8).tolist() == [[0], [0]]
    x = torch.randn(3, 5)
    x[1] = 0
    w = torch.randn(5, 4)
    w[:, 2] = 0
    y = lns_matmul(x, w, *LNS_FORMATS["lns8-g8"])
    assert (y[1] == 0).all() and (y[:, 2] == 0).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_matmul_exact_on_signed_powers_of_two(fmt, chunk_size):
    """Powers of two are represented exactly and their products and sums are exact in fp32, so the LNS
    result must equal F.linear bit for bit: this checks the exponent sums, the LUT and the sum over k
    across and within chunks."""
    g = torch.Generator().manual_seed(2)
    spread = min(6, int(fmt.octaves) // 2)  # products stay within the table without underflow
    x = signed_powers_of_two((2, 3, 37), spread, g)
    w = signed_powers_of_two((11, 37), spread, g) * 2.0**-5
    ref = F.linear(x, w)
    out = lns_matmul(x, w.T, *fmt, chunk_size=chunk_size)
    assert out.shape == (2, 3, 11) and torch.equal(out, ref)


def test_matmul_sums_over_k():
    k = 300
    ones = lns_matmul(torch.ones(2, k), torch.ones(k, 3), 8, 7, chunk_size=7)
    assert torch.equal(ones, torch.full((2, 3), float(k)))
    w = torch.randn(k, 4)
    picked = lns_matmul(torch.eye(k)[[5, 250]], w, 8, 7, chunk_size=16)  # one-hot rows pick rows of w
    s, e = lns_encode(w, 8, 7, lns_scale_exponent(w, 8, dim=0))
    torch.testing.assert_close(picked, lns_decode(s, e, 8, 7, lns_scale_exponent(w, 8, dim=0))[[5, 250]],
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_matmul_error_bounded_by_per_product_bound(fmt):
    """Each product is off by a factor within 2^(+-1/gamma), so |lns - exact| <= (2^(1/gamma) - 1) sum_k |x w|
    (plus fp32 rounding) for operands inside the range, on many random draws."""
    g = torch.Generator().manual_seed(3)
    per_product = 2 ** (1 / fmt.gamma) - 1
    for _ in range(5):
        def draw(shape):
            mag = torch.exp2(-torch.rand(shape, generator=g, dtype=torch.float64) * (fmt.octaves - 1))
            return (mag * (torch.randint(0, 2, shape, generator=g) * 2 - 1)).float()

        x, w = draw((6, 50)), draw((50, 7)) * 0.01
        exact = x.double() @ w.double()
        absolute = x.double().abs() @ w.double().abs()
        err = (lns_matmul(x, w, *fmt, chunk_size=8).double() - exact).abs()
        assert (err <= absolute * (per_product + 1e-5)).all()


def test_matmul_matches_per_product_reference():
    """Against a direct evaluation of the formula: decode each operand's exponent, add, convert each product
    with 2^floor(e / gamma) * 2^((e mod gamma) / gamma), sum in float64."""
    gamma, exp_bits = 4, 5
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 9, generator=g), torch.randn(9, 2, generator=g)
    x[0, 1] = 0
    bx, bw = lns_scale_exponent(x, gamma, 1), lns_scale_exponent(w, gamma, 0)
    (sx, ex), (sw, ew) = lns_encode(x, gamma, exp_bits, bx), lns_encode(w, gamma, exp_bits, bw)
    zero = lns_zero_code(exp_bits)
    ref = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            for k in range(9):
                if ex[i, k] == zero or ew[k, j] == zero:
                    continue
                e = int(ex[i, k] + ew[k, j])
                ref[i, j] += int(sx[i, k] * sw[k, j]) * 2.0 ** (e // gamma) * 2.0 ** ((e % gamma) / gamma)
            ref[i, j] *= 2.0 ** (int(bx[i, 0] + bw[0, j]) / gamma)
    torch.testing.assert_close(lns_matmul(x, w, gamma, exp_bits, chunk_size=4).double(), ref, rtol=1e-6, atol=0)


def test_training_mode_is_f_linear_and_gradients_flow():
    torch.manual_seed(5)
    linear = nn.Linear(12, 5)
    layer = LNSLinear.from_linear(linear, *LNS_FORMATS["lns8-g8"])
    assert layer.weight is linear.weight and layer.bias is linear.bias and layer.training
    x = torch.randn(4, 3, 12, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, linear.weight, linear.bias))
    out.square().sum().backward()
    assert x.grad is not None and layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0


def test_eval_mode_is_lns_and_caches_the_weight():
    torch.manual_seed(6)
    layer = LNSLinear(16, 6, gamma=8, exp_bits=7).eval()
    x = torch.randn(2, 4, 16)
    out = layer(x)
    expected = lns_matmul(x, layer.weight.detach().T, 8, 7) + layer.bias.detach()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(out, F.linear(x, layer.weight, layer.bias))  # it is not the fp matmul
    codes = layer.encoded_weight()
    layer(x)
    assert layer.encoded_weight() is codes  # no re-encoding while the weight is unchanged
    with torch.no_grad():
        layer.weight.mul_(-2)  # in place: same storage, new version
    assert layer.encoded_weight() is not codes
    torch.testing.assert_close(layer(x), lns_matmul(x, layer.weight.detach().T, 8, 7) + layer.bias.detach(),
                               rtol=0, atol=0)
    assert layer(torch.randn(3, 0, 16)).shape == (3, 0, 6) and layer(torch.randn(16)).shape == (6,)
    layer.load_state_dict({"weight": torch.randn(6, 16), "bias": torch.zeros(6)})
    torch.testing.assert_close(layer(x), lns_matmul(x, layer.weight.detach().T, 8, 7), rtol=0, atol=0)


def test_eval_error_tracks_format_resolution():
    """Relative output error on Gaussian data shrinks with gamma and stays under the per-product bound."""
    torch.manual_seed(7)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64)
    ref = linear(x)
    errs = []
    for name in ("lns6-g4", "lns8-g8", "lns12-g128"):
        layer = LNSLinear.from_linear(linear, *LNS_FORMATS[name]).eval()
        errs.append(((layer(x) - ref).norm() / ref.norm()).item())
        assert errs[-1] < 2 ** (1 / LNS_FORMATS[name].gamma) - 1
    assert errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("kwargs,name", [
    ({"gamma": 0}, "gamma"),
    ({"exp_bits": 1}, "exp_bits"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LNSLinear(4, 3, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="multiply"):
        lns_matmul(torch.randn(2, 3), torch.randn(4, 5), 8, 7)


def test_format_table_is_consistent():
    for name, fmt in LNS_FORMATS.items():
        assert name == f"lns{fmt.bits}-g{fmt.gamma}"
        assert fmt.octaves == (2**fmt.exp_bits - 2) / fmt.gamma
        assert math.isclose(fmt.rel_error_bound, 2 ** (1 / (2 * fmt.gamma)) - 1)
