"""Causal O(N) resolvent ("BK") token mixer of the Phase 1 language model.

Per channel, the tokens 0..t define a tridiagonal operator H_{0..t} with diagonal a_s and couplings whose
product across the bond (s-1, s) is k_s >= 0. The feature of token t is the last diagonal entry of the
resolvent of the *leading* block,

    g_t = [(H_{0..t} - z)^{-1}]_{tt} = 1 / (d_t - k_t g_{t-1}),    d_t = a_t - z,  Im z = eta > 0,

which depends on tokens 0..t only (the diagonal of the inverse of the *full* matrix would also depend on later
tokens). With Im d_t <= -eta and real k_t >= 0 every g_t lies in the upper half-plane and |g_t| <= 1 / eta.

``resolvent_diagonal`` evaluates the continued fraction either token by token (``"sequential"``, the reference;
autograd differentiates it), in a chunked parallel form (``"parallel"``, the default; its exact backward is
the reverse linear scan of the recurrence) or with the fused Triton kernels of
:mod:`models.layers.bk_mixer_triton` (``"triton"``: one launch forward, one backward). ``BKMixer`` wraps it as a
token mixer with input-dependent diagonal, couplings and a value path; its ``backend`` picks the kernels on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from models.layers.bk_mixer_triton import HAS_TRITON, bk_mixer_triton, resolvent_diagonal_triton

_METHODS = ("parallel", "sequential", "triton")
_BACKENDS = ("auto", "torch", "triton")


def _check_inputs(d: torch.Tensor, k: torch.Tensor, g0: torch.Tensor | None) -> None:
    if not d.is_complex():
        raise TypeError(f"d must be complex, got {d.dtype}")
    if d.dim() < 2 or d.shape[-2] < 1:
        raise ValueError(f"d must have shape (..., N, C) with N >= 1, got {tuple(d.shape)}")
    if k.dtype != d.real.dtype or k.shape != d.shape:
        raise ValueError(f"k must be real {d.real.dtype} of shape {tuple(d.shape)}, got {k.dtype} {tuple(k.shape)}")
    if g0 is not None and (g0.dtype != d.dtype or g0.shape != d.shape[:-2] + d.shape[-1:]):
        raise ValueError(
            f"g0 must be {d.dtype} of shape {tuple(d.shape[:-2] + d.shape[-1:])}, got {g0.dtype} {tuple(g0.shape)}"
        )


def _sequential(d: torch.Tensor, k: torch.Tensor, g0: torch.Tensor | None) -> torch.Tensor:
    """The continued fraction token by token (reference; differentiated by autograd)."""
    g = g0
    out = []
    for t in range(d.shape[-2]):
        d_t = d[..., t, :]
        g = torch.reciprocal(d_t if g is None else d_t - k[..., t, :] * g)
        out.append(g)
    return torch.stack(out, dim=-2)


def _scan_forward(d4: torch.Tensor, k4: torch.Tensor, g0: torch.Tensor | None) -> torch.Tensor:
    """g for chunked inputs d4, k4 of shape (B, n_chunks, L, C).

    Pass 1 composes, for every chunk at once, the transfer matrices M_t = [[d_t, -k_t], [1, 0]] of its tokens,
    keeping the product P normalised as P / P[0, 0] = [[1, b], [c, e]]. P[0, 0] is the determinant of the
    chunk's block of (H - z), never zero, and b, c, e are bounded entries of the block's resolvent times k, so
    nothing over- or underflows however long the chunk (a raw product grows like prod |d_t|). Pass 2 carries g
    across chunk boundaries with the Moebius map g -> (c + e g) / (1 + b g) of each chunk (one step per chunk).
    Pass 3 runs the continued fraction inside all chunks at once from their carried boundary values.
    Work is O(N); the Python loops run L + n_chunks + L steps, each over (B, n_chunks, C).
    """
    batch, n_chunks, length, channels = d4.shape
    g_in = d4.new_zeros(batch, n_chunks, channels)
    if g0 is not None:
        g_in[:, 0] = g0
    if n_chunks > 1:
        dd, kk = d4[:, :-1], k4[:, :-1]  # the last chunk's product is never needed
        c = torch.reciprocal(dd[:, :, 0])
        b = -kk[:, :, 0] * c
        e = torch.zeros_like(c)
        for j in range(1, length):
            d_j, k_j = dd[:, :, j], kk[:, :, j]
            r = torch.reciprocal(d_j - k_j * c)  # M_j P, renormalised by its new [0, 0] entry
            b, e, c = r * (d_j * b - k_j * e), r * b, r
        g = g_in[:, 0]
        for i in range(n_chunks - 1):
            g = (c[:, i] + e[:, i] * g) / (1 + b[:, i] * g)
            g_in[:, i + 1] = g
    out = torch.empty_like(d4)
    g = g_in
    for j in range(length):
        g = torch.reciprocal(d4[:, :, j] - k4[:, :, j] * g, out=out[:, :, j])
    return out


def _scan_backward(
    g4: torch.Tensor, k4: torch.Tensor, g0: torch.Tensor | None, grad4: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradients of the continued fraction by the reverse linear scan.

    With PyTorch's convention (the gradient of a complex tensor is dL/dRe + i dL/dIm and a holomorphic f maps
    an output gradient G to conj(f') G) and w_t = conj(g_t)^2 lambda_t:
        lambda_t = G_t + k_{t+1} w_{t+1},  grad d_t = -w_t,  grad k_t = Re(conj(g_{t-1}) w_t),  grad g0 = k_0 w_0.
    The incoming term s = k_{t+1} w_{t+1} of each chunk is affine in the one of the next chunk (s -> S + T s),
    so the same three passes as the forward apply. Returns (grad d4, grad k4, k_0 w_0 per chunk).
    """
    batch, n_chunks, length, channels = g4.shape
    s_in = g4.new_zeros(batch, n_chunks, channels)
    if n_chunks > 1:
        gg, kk, gr = g4[:, 1:], k4[:, 1:], grad4[:, 1:]  # the first chunk's map is never needed
        s = torch.zeros_like(s_in[:, 1:])
        t = torch.ones_like(s)
        for j in range(length - 1, -1, -1):
            qk = (gg[:, :, j] * gg[:, :, j]).conj() * kk[:, :, j]
            s = qk * (gr[:, :, j] + s)
            t = t * qk
        carry = s_in[:, -1]
        for i in range(n_chunks - 2, -1, -1):
            carry = s[:, i] + t[:, i] * carry
            s_in[:, i] = carry
    g_prev0 = torch.cat([g4.new_zeros(batch, 1, channels) if g0 is None else g0[:, None], g4[:, :-1, -1]], dim=1)
    w4 = torch.empty_like(g4)
    grad_k4 = torch.empty_like(k4)
    s = s_in
    for j in range(length - 1, -1, -1):
        g_j = g4[:, :, j]
        w = torch.mul((g_j * g_j).conj(), grad4[:, :, j] + s, out=w4[:, :, j])
        g_prev = g4[:, :, j - 1] if j > 0 else g_prev0
        grad_k4[:, :, j] = (g_prev.conj() * w).real
        s = k4[:, :, j] * w
    return w4.neg_(), grad_k4, s


class _ResolventScan(torch.autograd.Function):
    """Chunked parallel continued fraction with the reverse-scan backward; saves only g and k."""

    @staticmethod
    def forward(ctx, d4: torch.Tensor, k4: torch.Tensor, g0: torch.Tensor | None) -> torch.Tensor:
        g4 = _scan_forward(d4, k4, g0)
        ctx.save_for_backward(g4, k4, g0)
        return g4

    @staticmethod
    @once_differentiable
    def backward(ctx, grad4: torch.Tensor):
        g4, k4, g0 = ctx.saved_tensors
        grad_d4, grad_k4, s = _scan_backward(g4, k4, g0, grad4)
        grad_g0 = s[:, 0] if g0 is not None and ctx.needs_input_grad[2] else None
        return grad_d4, grad_k4, grad_g0


def _parallel(d: torch.Tensor, k: torch.Tensor, g0: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    *lead, n, channels = d.shape
    d3, k3 = d.reshape(-1, n, channels), k.reshape(-1, n, channels)
    length = min(chunk_size, n)
    n_chunks = -(-n // length)
    pad = n_chunks * length - n
    if pad:  # trailing tokens with k = 0 are decoupled from the real ones and never reach them (causal)
        d3 = torch.cat([d3, d3.new_ones(d3.shape[0], pad, channels)], dim=1)
        k3 = torch.cat([k3, k3.new_zeros(k3.shape[0], pad, channels)], dim=1)
    g0_2 = None if g0 is None else g0.reshape(-1, channels)
    shape4 = (-1, n_chunks, length, channels)
    g4 = _ResolventScan.apply(d3.reshape(shape4), k3.reshape(shape4), g0_2)
    return g4.reshape(-1, n_chunks * length, channels)[:, :n].reshape(*lead, n, channels)


def resolvent_diagonal(
    d: torch.Tensor,
    k: torch.Tensor,
    g0: torch.Tensor | None = None,
    method: str = "parallel",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Causal resolvent diagonal g_t = 1 / (d_t - k_t g_{t-1}) along dim -2.

    Args:
        d: complex (..., N, C), the shifted diagonal a_t - z; |g| <= 1/eta holds when Im d <= -eta < 0.
        k: real (..., N, C), k >= 0, of d's real dtype; k[..., t, :] couples token t-1 to token t, so
            k[..., 0, :] multiplies ``g0``.
        g0: complex (..., C), g of the token before the first one (carried decoding state); ``None``: the first
            token has no predecessor.
        method: ``"parallel"`` (chunked transfer-matrix scan with an exact reverse-scan backward),
            ``"sequential"`` (token loop, the reference) or ``"triton"`` (the fused kernels; CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``).
        chunk_size: chunk length of the parallel form (capped at N).
    Returns:
        complex (..., N, C).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_inputs(d, k, g0)
    if method == "sequential":
        return _sequential(d, k, g0)
    if method == "triton":
        return resolvent_diagonal_triton(d, k, g0)
    return _parallel(d, k, g0, chunk_size)


def _abs_square(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 elementwise without a hypot or a reduction over a size-2 dimension (both slow on the CPU)."""
    return x.real.square().addcmul_(x.imag, x.imag)


def transfer_log10_condition(d: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """log10 of sigma_max / sigma_min of each transfer matrix M_t = [[d_t, -k_t], [1, 0]], elementwise.

    With F = |d|^2 + k^2 + 1 = sigma_max^2 + sigma_min^2 and |det M| = k = sigma_max sigma_min, the ratio is
    (F + sqrt((F - 2k)(F + 2k))) / (2 k), with F - 2k = |d|^2 + (k - 1)^2 (no cancellation). Per token and in log
    space, so nothing underflows the way a product of determinants over a long sequence does (nor overflows
    below |d| ~ 1e19 in float32); k = 0 (a decoupled token) gives +inf.
    """
    m = _abs_square(d)
    f = torch.addcmul(m, k, k).add_(1)
    root = torch.addcmul(m, k - 1, k - 1).sqrt_().mul_((f + 2 * k).sqrt_())  # sqrt((F - 2k)(F + 2k))
    return (f + root).log10_() - (2 * k).log10_()


class BKMixer(nn.Module):
    """Causal resolvent token mixer: y_t = W_o [eta Re(g_t) v_t, eta Im(g_t) v_t] (interleaved per channel).

    Per channel c: a = W_a x + b_a, k = softplus(W_k x + b_k), v = W_v x (one fused projection), z = i eta.
    Re z is 0: a real shift of z is the same as a shift of the bias b_a. g_t carries what tokens 0..t wrote into
    a and k; it gates the current token's value v_t, and eta g_t has modulus <= 1, so the feature is scale-free
    in eta. ``zero_init_output`` zeroes W_o (and its bias) so a block converted to this mixer starts as its
    baseline. An optional ``decay`` Gamma >= 0 enters as a - i (eta + Gamma) ("non-Hermitian forgetting");
    the bound tightens to |g_t| <= 1/(eta + Gamma_t).

    ``backend``: ``"auto"`` (default) runs the fused Triton kernels when the input is on CUDA, triton imports
    and ``method`` is ``"parallel"``, else ``method`` in torch; ``"torch"`` always ``method``; ``"triton"``
    always the kernels (on the CPU only under ``TRITON_INTERPRET=1``, for tests).
    """

    def __init__(
        self,
        d_model: int,
        eta: float = 1.0,
        chunk_size: int = 256,
        zero_init_output: bool = False,
        method: str = "parallel",
        track_stats: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.backend = backend
        self.d_model, self.eta, self.chunk_size, self.method = d_model, float(eta), chunk_size, method
        self.track_stats = track_stats
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(2 * d_model, d_model)
        if zero_init_output:
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)
        self._stats: dict[str, torch.Tensor] = {}

    def coefficients(
        self, x: torch.Tensor, decay: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d, k, v): the complex shifted diagonal a - i (eta + decay), the couplings k >= 0 and the values."""
        a, k_pre, v = self.in_proj(x).chunk(3, dim=-1)
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        a, k = a.to(real), F.softplus(k_pre.to(real))
        if decay is None:
            d = a - 1j * self.eta
        else:
            if decay.shape != a.shape:
                raise ValueError(f"decay must have shape {tuple(a.shape)}, got {tuple(decay.shape)}")
            d = torch.complex(a, -(decay.to(real) + self.eta))
        return d, k, v

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        decay: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d_model) -> y (B, N, d_model); with ``return_state`` also g of the last token (B, d_model).

        ``state`` is that g from the previous call: feeding a sequence in pieces (or token by token) with the
        carried state gives the same outputs as one call on the whole sequence.
        """
        y, g = self.mix(x, state, decay)
        return (y, g[..., -1, :]) if return_state else y

    def mix(self, x: torch.Tensor, state: torch.Tensor | None = None, decay: torch.Tensor | None = None,
            reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, g) of :meth:`forward`, with document resets (B, N) bool: the coupling k_t of a reset token to its
        predecessor is zeroed, so g_t = 1 / d_t restarts there. On the Triton path (``scan_method`` "triton") the
        whole mixer between the two projections, statistics included, is one kernel launch forward and one
        backward (:func:`models.layers.bk_mixer_triton.bk_mixer_triton`); the torch path is its reference."""
        if self.scan_method(x) == "triton":
            a_k_v = self.in_proj(x)
            if decay is not None and decay.shape != a_k_v.shape[:-1] + (self.d_model,):
                raise ValueError(f"decay must have shape {tuple(x.shape[:-1]) + (self.d_model,)}, got "
                                 f"{tuple(decay.shape)}")
            feature, g, stats = bk_mixer_triton(a_k_v, self.eta, decay, state, reset, self.track_stats)
            if stats is not None:
                self._stats = {"max_abs_g": stats[0], "bound": stats[2], "transfer_condition": stats[1],
                               "stable": stats[3] == 0}
            return self.out_proj(feature), g
        d, k, v = self.coefficients(x, decay)
        if reset is not None:
            k = k.masked_fill(reset[..., None], 0.0)
        g = resolvent_diagonal(d, k, state, method=self.method, chunk_size=self.chunk_size)
        if self.track_stats:
            self._record_stats(d.detach(), k.detach(), g.detach())
        feature = torch.view_as_real(g * (self.eta * v.to(k.dtype))).flatten(-2)  # [Re g v, Im g v] per channel
        return self.out_proj(feature.to(x.dtype)), g

    @property
    def epsilon(self) -> float:
        """The guide's name for ``eta`` (``Im z``)."""
        return self.eta

    def scan_method(self, x: torch.Tensor) -> str:
        """The ``resolvent_diagonal`` method this mixer runs for input ``x`` (see ``backend``)."""
        if self.backend == "triton" or (self.backend == "auto" and self.method == "parallel" and x.is_cuda
                                        and HAS_TRITON):
            return "triton"
        return self.method

    @torch.no_grad()
    def _record_stats(self, d: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> None:
        abs_g = _abs_square(g).sqrt_()
        max_abs_g = abs_g.amax()
        condition = transfer_log10_condition(d, k).amax()
        damping = d.imag.neg()  # eta + Gamma_t >= eta
        bound = damping.amin().reciprocal()  # 1 / (eta + Gamma_min)
        # per token |g_t| <= 1 / (eta + Gamma_t): a NaN fails the comparison
        stable = (abs_g.mul_(damping) <= 1 + 1e-3).all()
        self._stats = {"max_abs_g": max_abs_g, "bound": bound, "transfer_condition": condition, "stable": stable}

    def stats(self) -> dict[str, torch.Tensor]:
        """Detached scalars of the last forward (no host sync): ``max_abs_g``; ``bound`` = 1/(eta + Gamma_min)
        (1/eta without a decay);
        ``transfer_condition`` = max log10 sigma_max/sigma_min of the per-token transfer matrices (scale-free,
        see ``transfer_log10_condition``; +inf only for a token with k = 0, which is decoupled, not unstable);
        ``stable`` = every g_t finite and within its own bound 1/(eta + Gamma_t) (up to 1e-3 for rounding).
        Empty before the first forward or with ``track_stats=False``."""
        return dict(self._stats)
