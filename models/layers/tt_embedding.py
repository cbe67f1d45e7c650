"""Tensor-train (TT) matrix embedding: a ``V x D`` table stored as ``K`` small cores.

Row ``i`` and column ``j`` are split into digits, ``i = (i_1, ..., i_K)`` over ``vocab_factors`` (row-major,
``prod(vocab_factors) >= V``, the padded rows are never read) and ``j = (j_1, ..., j_K)`` over ``dim_factors``
(``prod(dim_factors) == D``). With cores ``G_k`` of shape ``(r_{k-1}, v_k, d_k, r_k)``, ``r_0 = r_K = 1``,

    E[i, j] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_K[:, i_K, j_K, :]

and the module holds ``sum_k r_{k-1} v_k d_k r_k`` numbers instead of ``V * D``. A lookup multiplies only
the ``K`` core slices its ids select; the tied output head (:meth:`TTEmbedding.logits`) contracts the hidden
state with the cores one at a time. Neither ever builds the dense table. :meth:`TTEmbedding.from_dense` is
TT-SVD (Oseledets 2011): sequential truncated SVDs of the table reshaped to ``(v_1 d_1) x (rest)``; for two
cores that is the best rank-``r`` approximation of the ``(v_1 d_1) x (v_2 d_2)`` unfolding (Eckart-Young).

Phase encoding: the bond space after core ``k`` (``k < K``) is read as ``C^{r_k / 2}`` (channel pairs
``(2m, 2m+1)``) and each pair is turned by a learnable phase ``e^{i phi_{k,m}}``, a 2 x 2 rotation in real
arithmetic; an odd last channel is left alone. The rotation multiplies core ``k`` along its last axis, so the
model is still exactly a TT with the same ranks: :meth:`tt_cores` returns the cores with the phases absorbed
and every method (lookup, dense table, logits) uses those. Why phases and nothing cleverer: anything
inserted between two cores must stay a linear map on the bond, or the result stops being a TT (row
normalisation of the looked-up vectors, for instance, does not factor through the cores). A rotation is
orthogonal, so it keeps the scale of the initialisation and of the TT-SVD cores, and it is a gauge: it
does not enlarge the set of matrices the cores can represent, it only gives the optimiser a few
(``sum_k r_k / 2``) parameters that mix bond channels at once. Whether that helps training is not measured
here. Phases start at zero (identity), so :meth:`from_dense` is exact with or without them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _vocab_factors(n: int, k: int) -> list[int]:
    """``k`` near-equal factors whose product is ``>= n`` (the smallest first factor ``f`` with ``f**k >= n``)."""
    factors, rest = [], n
    for left in range(k, 0, -1):
        f = max(1, round(rest ** (1.0 / left)))
        while f**left < rest:
            f += 1
        while f > 1 and (f - 1) ** left >= rest:
            f -= 1
        factors.append(f)
        rest = -(-rest // f)
    return factors


def _dim_factors(n: int, k: int) -> list[int]:
    """``k`` factors with product exactly ``n``, each the divisor of what is left closest to its ``k``-th root."""
    factors, rest = [], n
    for left in range(k, 1, -1):
        target = rest ** (1.0 / left)
        f = min((d for d in range(1, rest + 1) if rest % d == 0), key=lambda d: (abs(d - target), d))
        factors.append(f)
        rest //= f
    return factors + [rest]


def _check_factors(name: str, factors: list[int], num_cores: int) -> list[int]:
    factors = list(factors)
    if len(factors) != num_cores or any(not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"{name} must be {num_cores} positive integers (one per core), got {factors}")
    return factors


def _rotate_last(core: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2m, 2m+1)`` of the last axis by ``phase[m]``: ``core @ R(phase)``."""
    h = phase.numel()
    if h == 0:
        return core
    a, b = core[..., 0:2 * h:2], core[..., 1:2 * h:2]
    c, s = torch.cos(phase), torch.sin(phase)
    turned = torch.stack((a * c + b * s, b * c - a * s), dim=-1).flatten(-2)
    return torch.cat((turned, core[..., 2 * h:]), dim=-1)


def _contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """The full ``prod(v) x prod(d)`` table of a TT, rows and columns in row-major digit order."""
    out = cores[0][0]  # (v_1, d_1, r_1)
    for core in cores[1:]:
        a, b, _ = out.shape
        _, v, d, s = core.shape
        out = torch.einsum("abr,rvds->avbds", out, core).reshape(a * v, b * d, s)
    return out.reshape(out.shape[0], out.shape[1])


def _tt_svd(table: torch.Tensor, vf: list[int], df: list[int], ranks: list[int]) -> list[torch.Tensor]:
    """Cores of the TT-SVD of a ``prod(vf) x prod(df)`` table: sequential SVDs truncated to ``ranks``."""
    n = len(vf)
    order = [i for k in range(n) for i in (k, n + k)]  # (v_1, d_1, v_2, d_2, ...)
    rest = table.reshape(*vf, *df).permute(order).reshape(vf[0] * df[0], -1)
    cores = []
    for k in range(n - 1):
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(ranks[k], vf[k], df[k], r))
        rest = (s[:r, None] * vh[:r]).reshape(r * vf[k + 1] * df[k + 1], -1)
    return cores + [rest.reshape(ranks[-2], vf[-1], df[-1], 1)]


_MAX_PAD_REFINEMENTS = 50


class TTEmbedding(nn.Module):
    """Embedding table in tensor-train format; drop-in for ``nn.Embedding`` lookups and a tied output head.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: ``D``.
        rank: largest TT rank; each bond rank is also capped at the rank of its unfolding
            (``min(prod_{l<=k} v_l d_l, prod_{l>k} v_l d_l)``), above which extra channels add nothing.
        num_cores: ``K >= 2``.
        phase_encoding: learnable bond phases (see the module docstring).
        vocab_factors: ``K`` integers with product ``>= V``; default near-equal (50000 -> 224 x 224).
        dim_factors: ``K`` integers with product ``== D``; default the most balanced divisors (1024 -> 32 x 32).
        init_std: cores are drawn so every entry of the table has variance ``init_std**2``, as in
            ``nn.init.normal_(weight, std=init_std)``; the mean squared row norm is then ``D * init_std**2``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int = 16,
        num_cores: int = 2,
        phase_encoding: bool = True,
        vocab_factors: list[int] | None = None,
        dim_factors: list[int] | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim), ("rank", rank)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_cores < 2:
            raise ValueError(f"num_cores must be >= 2, got {num_cores}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        vf = _vocab_factors(num_embeddings, num_cores) if vocab_factors is None else vocab_factors
        df = _dim_factors(embedding_dim, num_cores) if dim_factors is None else dim_factors
        vf, df = _check_factors("vocab_factors", vf, num_cores), _check_factors("dim_factors", df, num_cores)
        if math.prod(vf) < num_embeddings:
            raise ValueError(f"vocab_factors {vf} multiply to {math.prod(vf)} < num_embeddings={num_embeddings}")
        if math.prod(df) != embedding_dim:
            raise ValueError(f"dim_factors {df} multiply to {math.prod(df)} != embedding_dim={embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_factors, self.dim_factors = vf, df
        sizes = [v * d for v, d in zip(vf, df)]
        #: bond ranks r_0..r_K (r_0 = r_K = 1)
        self.ranks = [1] + [min(rank, math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, num_cores)] + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], vf[k], df[k], self.ranks[k + 1])) for k in range(num_cores)
        )
        self.phases = (
            nn.ParameterList(nn.Parameter(torch.zeros(self.ranks[k + 1] // 2)) for k in range(num_cores - 1))
            if phase_encoding else None
        )
        # Var(E_ij) = prod_k std_k^2 * prod(internal ranks): equal stds per core give Var = init_std^2.
        core_std = (init_std / math.sqrt(math.prod(self.ranks[1:-1]))) ** (1.0 / num_cores)
        for core in self.cores:
            nn.init.normal_(core, std=core_std)
        self._strides = [math.prod(vf[k + 1:]) for k in range(num_cores)]

    @property
    def num_cores(self) -> int:
        return len(self.cores)

    @property
    def padded_rows(self) -> int:
        """``prod(vocab_factors)``: rows of the TT, of which the first ``num_embeddings`` are used."""
        return math.prod(self.vocab_factors)

    def tt_cores(self) -> list[torch.Tensor]:
        """The cores of the represented TT, phases absorbed; shapes ``(r_{k-1}, v_k, d_k, r_k)``."""
        if self.phases is None:
            return list(self.cores)
        last = len(self.cores) - 1
        return [core if k == last else _rotate_last(core, self.phases[k]) for k, core in enumerate(self.cores)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape, integer) -> ``(*ids.shape, D)``, contracting only the selected core slices."""
        if ids.device.type == "cpu" and ids.numel() and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            # Checked on the CPU only: elsewhere the check would cost a host sync on every lookup.
            raise IndexError(f"ids must lie in [0, {self.num_embeddings}), got [{ids.min()}, {ids.max()}]")
        flat = ids.reshape(-1)
        n = flat.numel()
        cores = self.tt_cores()
        digit = (flat // self._strides[0]) % self.vocab_factors[0]
        out = cores[0][0, digit]  # (n, d_1, r_1)
        for k in range(1, len(cores)):
            digit = (flat // self._strides[k]) % self.vocab_factors[k]
            piece = cores[k].transpose(0, 1)[digit]  # (n, r_{k-1}, d_k, r_k)
            step = torch.bmm(out, piece.reshape(n, self.ranks[k], self.dim_factors[k] * self.ranks[k + 1]))
            out = step.reshape(n, out.shape[1] * self.dim_factors[k], self.ranks[k + 1])
        return out.reshape(*ids.shape, self.embedding_dim)

    def to_dense(self) -> torch.Tensor:
        """The ``V x D`` table (exact contraction of :meth:`tt_cores`, padded rows dropped)."""
        return _contract(self.tt_cores())[: self.num_embeddings]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head ``hidden @ E.T`` -> ``(..., V)``, contracting the cores from the last one.

        The largest intermediate holds ``N * D_{<k} * r_{k-1} * V_{>=k}`` numbers (two cores, 50000 x 1024,
        rank 16: ``N * 32 * 16 * 224``, about 2.3 times the ``N * V`` logits); the table is never built.
        """
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected {self.embedding_dim}")
        lead = hidden.shape[:-1]
        n = math.prod(lead)
        t = hidden.reshape(n, self.embedding_dim, 1, 1)  # (n, D_<=k, r_k, V_>k)
        for core, d in zip(reversed(self.tt_cores()), reversed(self.dim_factors)):
            r_prev, v, _, r = core.shape
            t = t.reshape(n, t.shape[1] // d, d, r, t.shape[-1])
            t = torch.einsum("npdsw,rvds->nprvw", t, core).reshape(n, t.shape[1], r_prev, v * t.shape[-1])
        return t.reshape(n, self.padded_rows)[:, : self.num_embeddings].reshape(*lead, self.num_embeddings)

    def num_parameters(self) -> int:
        """Stored numbers: ``sum_k r_{k-1} v_k d_k r_k`` plus ``sum_{k<K} floor(r_k / 2)`` phases."""
        return sum(p.numel() for p in self.parameters())

    def compression_ratio(self) -> float:
        """``V * D`` (an ``nn.Embedding``) over :meth:`num_parameters`."""
        return self.num_embeddings * self.embedding_dim / self.num_parameters()

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        rank: int,
        num_cores: int = 2,
        vocab_factors: list[int] | None = None,
        dim_factors: list[int] | None = None,
        phase_encoding: bool = True,
        pad_refinements: int | None = None,
    ) -> tuple[TTEmbedding, float]:
        """TT-SVD of ``weight`` (``V x D``) -> ``(module, ||weight - module.to_dense()||_F / ||weight||_F)``.

        Step ``k`` takes the truncated SVD ``U S V^T`` of the remainder reshaped to ``(r_{k-1} v_k d_k) x
        (rest)``, keeps ``U[:, :r_k]`` as core ``k`` and carries ``S V^T`` on. Two cores: the optimal rank-``r``
        TT. More cores: within ``sqrt(K - 1)`` of optimal (Oseledets 2011, Thm. 2.2). The padded rows are
        unknowns, not data: they start at zero, then they are set to the current approximation's rows and the
        TT-SVD is redone (with two cores no step can raise the error; without it a table that is exactly a TT
        would not be recovered once padded with zeros), ``pad_refinements`` times, or by default until the
        padded rows move by less than 1e-7 of the table's norm (at most 50 times: the error falls
        geometrically, and 3 fixed steps left 2.3 % on an exactly-TT table). The SVDs run in
        float64 for float64 weights, float32 otherwise; the cores are then rescaled by scalars with product 1
        so that every core has the same RMS entry (the table is unchanged), and take ``weight``'s dtype and
        device. Phases start at zero.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be a V x D matrix, got shape {tuple(weight.shape)}")
        if pad_refinements is not None and pad_refinements < 0:
            raise ValueError(f"pad_refinements must be >= 0 or None, got {pad_refinements}")
        v_total, dim = weight.shape
        module = cls(v_total, dim, rank, num_cores, phase_encoding, vocab_factors, dim_factors)
        vf, df, ranks = module.vocab_factors, module.dim_factors, module.ranks
        work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        work = F.pad(work, (0, 0, 0, module.padded_rows - v_total))
        cores = _tt_svd(work, vf, df, ranks)
        steps = _MAX_PAD_REFINEMENTS if pad_refinements is None else pad_refinements
        scale = torch.linalg.norm(work)
        for _ in range(steps if module.padded_rows > v_total else 0):
            new = _contract(cores)[v_total:]
            moved = torch.linalg.norm(new - work[v_total:])
            work[v_total:] = new
            cores = _tt_svd(work, vf, df, ranks)
            if pad_refinements is None and moved <= 1e-7 * scale:
                break
        rms = torch.stack([c.pow(2).mean().sqrt() for c in cores])
        if bool((rms > 0).all()):
            cores = [c * (rms.log().mean().exp() / r) for c, r in zip(cores, rms)]
        module = module.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for param, core in zip(module.cores, cores):
                param.copy_(core)
            err = torch.linalg.norm(module.to_dense().to(work.dtype) - work[:v_total])
            norm = torch.linalg.norm(work[:v_total])
        return module, float(err / norm) if norm > 0 else float(err)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_factors={self.vocab_factors}, "
                f"dim_factors={self.dim_factors}, ranks={self.ranks}, phase_encoding={self.phases is not None}")


#: The guide's name for :class:`TTEmbedding` (same class).
HolographicTTEmbedding = TTEmbedding
