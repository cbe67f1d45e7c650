"""``Linear4bit``: a linear layer whose frozen weight is stored in 4 bits (NF4/FP4) and dequantized per use.

Gradients reach the input through the dequantized weight; the 4-bit weight never gets one. On CUDA the
Triton kernels of :mod:`models.quant.triton_dequant` run (a fused dequantize + matmul, or the dequantize
alone), elsewhere the torch reference of :mod:`models.quant.nf4`.

Per training step the weight is needed twice, ``x @ W^T`` in the forward and ``grad @ W`` in the backward.
By default (``save_dequantized=False``, as bitsandbytes) it is dequantized again in the backward, so no
dense weight stays alive between the two. ``save_dequantized=True`` keeps the forward's dense copy (in
the compute dtype) for the backward: one dequantization per step instead of two, at the cost of holding a
dense copy of every quantized weight that takes part in a backward until that backward has run (the
memory 4-bit storage saves, during the step).
"""

from __future__ import annotations

import torch
from torch import nn

from models.quant.nf4 import (
    DOUBLE_QUANT_BLOCK_SIZE,
    QuantState,
    QuantType,
    _check_block_size,
    _check_quant_type,
    auto_compute_dtype,
    dequantize_4bit,
    quantize_4bit,
    resolve_compute_dtype,
)


def _triton_dequantize():
    """The Triton dequantize function, or ``None`` when triton is unavailable."""
    try:
        from models.quant.triton_dequant import dequantize_4bit_triton
    except ImportError:
        return None
    return dequantize_4bit_triton


def _triton_matmul():
    """The fused Triton dequantize + matmul function, or ``None`` when triton is unavailable."""
    try:
        from models.quant.triton_dequant import matmul_4bit_triton
    except ImportError:
        return None
    return matmul_4bit_triton


class _Linear4bitMatmul(torch.autograd.Function):
    """``x @ W_deq^T`` with ``W_deq`` rebuilt from the 4-bit buffers.

    Only ``x`` gets a gradient (``grad @ W_deq``). Without ``layer.save_dequantized`` nothing is saved but
    the layer reference and the backward dequantizes again (fused into the matmul on CUDA); with it the
    forward's dense weight is saved for the backward (one dequantization per step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer
        ctx.saved = layer.save_dequantized and ctx.needs_input_grad[0]
        if ctx.saved:
            w = layer.dequantize_weight(x.dtype)
            ctx.save_for_backward(w)
            return x @ w.t()
        return layer.matmul(x, transpose=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        if ctx.saved:
            (w,) = ctx.saved_tensors
            return grad @ w.to(grad.dtype), None
        return ctx.layer.matmul(grad, transpose=False), None


class Linear4bit(nn.Module):
    """A linear layer with a frozen 4-bit (NF4/FP4) weight stored packed as buffers.

    Buffers: ``weight_packed`` (uint8, two codes per byte) and the block statistics, either
    ``weight_absmax`` (fp32) or, with double quantization, ``weight_absmax_q`` (uint8),
    ``weight_absmax_scale`` (fp32 per 256 blocks) and ``weight_absmax_offset`` (fp32). The bias stays a
    full-precision parameter (trainable or not). The forward dequantizes to ``compute_dtype`` (Triton on
    CUDA), multiplies, and returns the input's dtype. Deliberately no ``weight`` attribute: code that
    would write into a float weight (``LoRALinear.merge``) fails loudly instead of silently.

    ``compute_dtype="auto"`` picks bfloat16 on devices that compute it natively and float32 elsewhere
    (:func:`models.quant.nf4.auto_compute_dtype`, decided by the device the buffers are on when used).
    ``module.to(dtype)``/``.half()``/``.bfloat16()`` cast the bias only: the statistics stay float32 (as
    bitsandbytes keeps them) and the codes uint8. ``save_dequantized``: see the module docstring.
    """

    _STAT_BUFFERS = ("weight_absmax", "weight_absmax_scale", "weight_absmax_offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: QuantType = "nf4",
        compute_dtype: str | torch.dtype = "auto",
        use_double_quant: bool = True,
        block_size: int = 64,
        device: torch.device | str | None = None,
        save_dequantized: bool = False,
    ) -> None:
        super().__init__()
        _check_quant_type(quant_type)
        _check_block_size(block_size)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.block_size = quant_type, block_size
        self.compute_dtype_setting = resolve_compute_dtype(compute_dtype)
        self.use_double_quant = bool(use_double_quant)
        self.save_dequantized = bool(save_dequantized)
        n_blocks = max(1, -(-(in_features * out_features) // block_size))
        self.register_buffer("weight_packed", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        if self.use_double_quant:
            n_groups = -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE)
            self.register_buffer("weight_absmax_q", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax_scale", torch.zeros(n_groups, dtype=torch.float32, device=device))
            self.register_buffer("weight_absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: QuantType = "nf4",
        compute_dtype: str | torch.dtype = "auto",
        use_double_quant: bool = True,
        block_size: int = 64,
        save_dequantized: bool = False,
    ) -> "Linear4bit":
        """Quantize an ``nn.Linear``; its bias is copied with its dtype and ``requires_grad``."""
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, quant_type, compute_dtype,
            use_double_quant, block_size, device=w.device, save_dequantized=save_dequantized,
        )
        layer.load_state(quantize_4bit(w, quant_type, block_size, use_double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @torch.no_grad()
    def load_state(self, state: QuantState) -> None:
        """Copy a :class:`QuantState` (same shape and settings) into the buffers."""
        expected = (self.quant_type, self.block_size, self.use_double_quant, (self.out_features, self.in_features))
        got = (state.quant_type, state.block_size, state.double_quant, tuple(state.shape))
        if got != expected:
            raise ValueError(f"QuantState (quant_type, block_size, double_quant, shape)={got} does not fit {expected}")
        for name, t in state.tensors().items():
            getattr(self, "weight_" + name).copy_(t)

    def quant_state(self) -> QuantState:
        """The buffers as a :class:`QuantState` (views, no copies)."""
        state = QuantState(self.weight_packed, torch.Size((self.out_features, self.in_features)),
                           self.quant_type, self.block_size)
        if self.use_double_quant:
            state.absmax_q, state.absmax_scale = self.weight_absmax_q, self.weight_absmax_scale
            state.absmax_offset = self.weight_absmax_offset
        else:
            state.absmax = self.weight_absmax
        return state

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the dequantized weight and the matmul (``auto`` resolved for the buffers' device)."""
        if self.compute_dtype_setting == "auto":
            return auto_compute_dtype(self.weight_packed.device)
        return self.compute_dtype_setting

    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()`` move the statistics but never change their dtype (float32)."""
        stats = {n: self._buffers.pop(n) for n in self._STAT_BUFFERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in stats.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``(out_features, in_features)`` in ``dtype`` (default ``compute_dtype``)."""
        dtype = dtype or self.compute_dtype
        state = self.quant_state()
        if self.weight_packed.is_cuda:
            triton_dequantize = _triton_dequantize()
            if triton_dequantize is not None:
                return triton_dequantize(state, dtype)
        return dequantize_4bit(state, dtype)

    def matmul(self, a: torch.Tensor, transpose: bool = True) -> torch.Tensor:
        """``a @ W^T`` (``transpose``, the forward) or ``a @ W`` (the input gradient), ``W`` dequantized to
        ``a.dtype``. On CUDA one fused Triton kernel dequantizes tiles of ``W`` inside the matmul (no dense
        weight in memory); elsewhere the dense weight is built, used and dropped."""
        if a.is_cuda and self.weight_packed.is_cuda:
            fused = _triton_matmul()
            if fused is not None:
                return fused(a, self.quant_state(), transpose=transpose)
        w = self.dequantize_weight(a.dtype)
        return a @ (w.t() if transpose else w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Linear4bitMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight (packed codes + statistics), bias excluded."""
        return self.quant_state().nbytes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, compute_dtype={self.compute_dtype_setting}, "
            f"double_quant={self.use_double_quant}, block_size={self.block_size}, "
            f"save_dequantized={self.save_dequantized}"
        )
