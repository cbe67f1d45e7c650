"""Logarithmic number system (LNS) linear layers for inference, emulated in PyTorch (as in LNS-Madam).

A value is a sign and an integer exponent ``e``: ``x ~ sign * 2^((e + b) / gamma)``. ``gamma`` (the base
factor) sets the resolution, ``1 / gamma`` of an octave, so rounding in the log domain has relative error at
most ``2^(1 / (2 gamma)) - 1``. ``b`` is an integer scale exponent per row (per input row of activations,
per output channel of weights; see :func:`lns_scale_exponent`) that puts the row's largest magnitude at
the top code, like the absmax of 4-bit formats. A format with ``exp_bits`` exponent bits keeps the
``2^exp_bits - 1`` exponents ``-(2^exp_bits - 2) .. 0`` and one zero code (:func:`lns_zero_code`), so it
spans ``(2^exp_bits - 2) / gamma`` octaves below the row's maximum; storage is ``1 + exp_bits`` bits a value
plus the integer ``b`` per row. Values below the range round to the nearer of zero and the smallest
magnitude; values above it saturate (only possible with an explicit ``bias``).

A product adds exponents, ``e = e_x + e_w``; it goes back to the linear domain as
``2^floor(e / gamma) * LUT[e mod gamma]`` with ``LUT[r] = 2^(r / gamma)`` (fp32), and the products are summed
over ``k`` in fp32, then scaled by ``2^((b_x + b_w) / gamma)``. Summing in the linear domain is what makes
this exact up to the per-value rounding: a max-log sum (keeping the larger exponent) is not. The emulation
looks every signed product up in a table of all ``2 * (2^exp_bits - 2) + 1`` exponent sums, which is the same
formula evaluated ahead of time, and goes over ``k`` in chunks so the ``m x chunk x n`` intermediate stays
bounded. :class:`LNSLinear` trains with the ordinary ``F.linear`` on its full-precision weight (LNS-Madam
trains with an LNS optimizer; this module does not) and runs the LNS emulation in eval mode.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_CHUNK_ELEMENTS = 1 << 22  # products held at once by the k-chunked emulation


class LNSFormat(NamedTuple):
    """``gamma`` (base factor, steps per octave) and ``exp_bits``; one more bit holds the sign."""

    gamma: int
    exp_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits

    @property
    def octaves(self) -> float:
        """Dynamic range below a row's largest magnitude."""
        return (2**self.exp_bits - 2) / self.gamma

    @property
    def rel_error_bound(self) -> float:
        """Largest relative rounding error of an in-range value."""
        return 2 ** (1 / (2 * self.gamma)) - 1


#: Named formats ``lns{bits}-g{gamma}``. At a fixed width, ``gamma`` trades range for resolution. ``lns8-g8``
#: is LNS-Madam's 8-bit choice; ``lns16-g1024`` puts 16 bits into resolution (32 octaves of range) rather
#: than into a 512-octave range (``gamma = 64``) that no layer's rows need.
LNS_FORMATS: dict[str, LNSFormat] = {
    "lns4-g2": LNSFormat(gamma=2, exp_bits=3),  # 3 octaves, <= 18.9 % per value
    "lns6-g4": LNSFormat(gamma=4, exp_bits=5),  # 7.5 octaves, <= 9.1 %
    "lns8-g8": LNSFormat(gamma=8, exp_bits=7),  # 15.75 octaves, <= 4.4 %
    "lns8-g16": LNSFormat(gamma=16, exp_bits=7),  # 7.9 octaves, <= 2.2 %
    "lns12-g128": LNSFormat(gamma=128, exp_bits=11),  # 16 octaves, <= 0.27 %
    "lns16-g1024": LNSFormat(gamma=1024, exp_bits=15),  # 32 octaves, <= 0.034 %
}


def _check_format(gamma: int, exp_bits: int) -> None:
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if not 2 <= exp_bits <= 20:
        raise ValueError(f"exp_bits must be in 2..20, got {exp_bits}")


def lns_zero_code(exp_bits: int) -> int:
    """The exponent code that means zero: ``-(2^exp_bits - 1)``, just below the smallest exponent."""
    return -(2**exp_bits - 1)


@functools.lru_cache(maxsize=64)
def _lut(gamma: int, device: torch.device) -> torch.Tensor:
    """``LUT[r] = 2^(r / gamma)`` rounded to fp32."""
    return torch.tensor([2.0 ** (r / gamma) for r in range(gamma)], dtype=torch.float32, device=device)


def _pow2(e: torch.Tensor, gamma: int) -> torch.Tensor:
    """``2^floor(e / gamma) * LUT[e mod gamma]`` in fp32 (the scaling by a power of two is exact)."""
    e = e.long()
    lut = _lut(gamma, e.device)
    scaled = torch.ldexp(lut[e.remainder(gamma)].double(), torch.div(e, gamma, rounding_mode="floor").double())
    return scaled.float()


def lns_scale_exponent(x: torch.Tensor, gamma: int, dim: int = -1) -> torch.Tensor:
    """Integer ``b = ceil(gamma * log2(max |x|))`` along ``dim`` (kept), 0 for all-zero rows: with it the
    largest magnitude gets exponent 0 or -1, the top of the range."""
    amax = x.detach().abs().float().amax(dim=dim, keepdim=True)
    b = torch.ceil(gamma * torch.log2(amax))
    return torch.where(amax > 0, b, torch.zeros_like(b)).to(torch.int32)


def lns_encode(
    x: torch.Tensor, gamma: int, exp_bits: int, bias: torch.Tensor | int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (finite) -> ``(sign, exponent)``: int8 signs (+1 for zero) and int32 exponents in
    ``-(2^exp_bits - 2) .. 0`` or :func:`lns_zero_code`, with ``x ~ sign * 2^((exponent + bias) / gamma)``.

    The exponent is ``round(gamma * log2|x|) - bias``, rounded in the log domain; ``bias`` broadcasts
    against ``x`` (``0`` suits values with ``|x| <= 1``; :func:`lns_scale_exponent` gives one per row).
    """
    _check_format(gamma, exp_bits)
    mag = x.detach().abs()
    mag = mag.double() if mag.dtype == torch.float64 else mag.float()
    bias = torch.as_tensor(bias, device=x.device)
    low = -(2**exp_bits - 2)
    e = torch.round(gamma * torch.log2(mag)) - bias
    smallest = _pow2(low + bias, gamma).to(mag.dtype)
    zero = (mag == 0) | ((e < low) & (mag < smallest / 2))  # nearer zero than the smallest magnitude
    e = torch.where(zero, lns_zero_code(exp_bits), e.clamp(low, 0)).to(torch.int32)
    sign = torch.where(x < 0, -1, 1).to(torch.int8)
    return sign, e


def lns_decode(
    sign: torch.Tensor, exponent: torch.Tensor, gamma: int, exp_bits: int, bias: torch.Tensor | int = 0
) -> torch.Tensor:
    """fp32 values ``sign * 2^floor(E / gamma) * LUT[E mod gamma]``, ``E = exponent + bias``; zero code -> 0."""
    _check_format(gamma, exp_bits)
    zero = exponent == lns_zero_code(exp_bits)
    value = sign.float() * _pow2(torch.where(zero, 0, exponent) + torch.as_tensor(bias, device=exponent.device),
                                 gamma)
    return torch.where(zero, torch.zeros_like(value), value)


@functools.lru_cache(maxsize=64)
def _product_table(gamma: int, exp_bits: int, device: torch.device) -> torch.Tensor:
    """Every signed product: index ``s * L + j`` (``j = -(e_x + e_w)``, ``s`` = number of negative factors,
    ``L = 2 (2^exp_bits - 2) + 1``) holds ``(-1)^s 2^(-j / gamma)``; indices ``>= 3 L`` (a zero factor) hold 0."""
    span = 2 * (2**exp_bits - 2) + 1
    mag = _pow2(-torch.arange(span, device=device), gamma)
    return torch.cat((mag, -mag, mag, torch.zeros(3 * span + 1, device=device)))


def _operand_index(x: torch.Tensor, gamma: int, exp_bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` with a scale exponent per slice along ``dim``; returns (table index part, scale exponent)."""
    bias = lns_scale_exponent(x, gamma, dim)
    sign, e = lns_encode(x, gamma, exp_bits, bias)
    span = 2 * (2**exp_bits - 2) + 1
    index = torch.where(e == lns_zero_code(exp_bits), 3 * span, -e.long() + span * (sign < 0).long())
    return index, bias


def _matmul_indices(ix: torch.Tensor, bx: torch.Tensor, iw: torch.Tensor, bw: torch.Tensor, gamma: int,
                    exp_bits: int, chunk_size: int | None) -> torch.Tensor:
    """``(m, k)`` and ``(k, n)`` encoded operands -> fp32 ``(m, n)``: products looked up, summed over k in
    chunks, then scaled by ``2^((b_x + b_w) / gamma)``."""
    m, k = ix.shape
    n = iw.shape[1]
    table = _product_table(gamma, exp_bits, ix.device)
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, m * n))
    out = torch.zeros(m, n, dtype=torch.float32, device=ix.device)
    for start in range(0, k, chunk):
        idx = ix[:, start:start + chunk, None] + iw[None, start:start + chunk, :]  # (m, c, n)
        out += table[idx].sum(dim=1)
    return out * _pow2(bx + bw, gamma)


def lns_matmul(x: torch.Tensor, w: torch.Tensor, gamma: int, exp_bits: int,
               chunk_size: int | None = None) -> torch.Tensor:
    """``x @ w`` with both operands in LNS: ``x`` (..., k) scaled per row, ``w`` (k, n) per column; fp32 out.

    ``F.linear(x, W)`` is ``lns_matmul(x, W.T, ...)`` up to the LNS rounding. ``chunk_size`` (default: enough
    for about 4 M products at once) is how many ``k`` are looked up together.
    """
    _check_format(gamma, exp_bits)
    if w.dim() != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"shapes {tuple(x.shape)} and {tuple(w.shape)} do not multiply")
    lead = x.shape[:-1]
    ix, bx = _operand_index(x.reshape(-1, x.shape[-1]), gamma, exp_bits, dim=1)
    iw, bw = _operand_index(w, gamma, exp_bits, dim=0)
    return _matmul_indices(ix, bx, iw, bw, gamma, exp_bits, chunk_size).reshape(*lead, w.shape[1])


class LNSLinear(nn.Module):
    """``nn.Linear`` that trains in full precision and infers in LNS.

    Training mode is ``F.linear`` with the fp weight (bit for bit, gradients as usual). Eval mode encodes
    the weight once (per output channel scale exponent), caches the codes, re-encodes when the weight
    changes (in-place updates, ``load_state_dict``, a new device or dtype), encodes the activations on every
    call (per token) and adds the bias in fp32. Eval outputs carry no gradient to the weight or input.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        gamma, exp_bits: the LNS format (see :data:`LNS_FORMATS`).
        chunk_size: ``k`` values looked up at once in eval mode (``None``: automatic).
        use_lns: the guide's switch: ``False`` keeps ``F.linear`` in eval mode too (an exact ``nn.Linear``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gamma: int = 8, exp_bits: int = 7,
                 chunk_size: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, use_lns: bool = True) -> None:
        super().__init__()
        self.use_lns = use_lns
        _check_format(gamma, exp_bits)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.in_features, self.out_features = in_features, out_features
        self.gamma, self.exp_bits, self.chunk_size = gamma, exp_bits, chunk_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._cache_key: tuple | None = None
        self._weight_codes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gamma: int = 8, exp_bits: int = 7,
                    chunk_size: int | None = None) -> LNSLinear:
        """Wrap ``linear``'s own weight and bias Parameters (shared, not copied: optimizer state stays valid).
        A named format: ``LNSLinear.from_linear(linear, *LNS_FORMATS["lns8-g8"])``."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, gamma, exp_bits, chunk_size,
                  device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def encoded_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``(table index (in, out), scale exponent (1, out))`` of ``weight.T``; re-encoded on change."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype, self.gamma, self.exp_bits)
        if key != self._cache_key:
            self._weight_codes = _operand_index(w.detach().t(), self.gamma, self.exp_bits, dim=0)
            self._cache_key = key
        return self._weight_codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.use_lns:
            return F.linear(x, self.weight, self.bias)
        iw, bw = self.encoded_weight()
        ix, bx = _operand_index(x.reshape(-1, self.in_features), self.gamma, self.exp_bits, dim=1)
        out = _matmul_indices(ix, bx, iw, bw, self.gamma, self.exp_bits, self.chunk_size)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gamma={self.gamma}, exp_bits={self.exp_bits}, use_lns={self.use_lns}")
