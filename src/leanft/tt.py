"""Tensor-train (TT) matrices: factor shapes, initialisation, contraction, dense materialisation.

A TT matrix ``W`` of size ``in x out`` is stored as ``N`` cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)``
with ``prod(n_k) = in * out`` and ``r_0 = r_N = 1``. The full tensor
``W[i_1..i_N] = G_1[:, i_1, :] @ ... @ G_N[:, i_N, :]`` is reshaped row-major to ``(in, out)``, so the
leading modes index the input (as in the LoRETTA reference code). The layer computes ``y = x W + b``.

Two contractions give the same result to float precision:

* ``"dense"``: build ``W`` (``in x out``) from the cores, then one matmul. Works for every shape.
* ``"factored"``: cut the chain where the input index ends (possibly inside a mode, which is then split
  ``n_k = a * b``), merge the left cores into ``L`` (``in x b*R``) and the right ones into ``Rt``
  (``R x out/b``), and compute ``(x L) Rt`` without ever materialising ``in x out``.

``TTMatrix.forward`` picks the cheaper one from a multiply-add count for the actual number of tokens.
Cores are kept in float32 whatever the model dtype; inputs are cast to fp32 and results cast back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Contraction = Literal["dense", "factored"]

# Factor shapes of the LoRETTA reference code (``TENSOR_SHAPE[key][h]``, product ``key * h``; key is the
# adapter bottleneck or the LoRA rank) and of its h x h classification head (``CLS_TENSOR_SHAPE[h]``).
# Used verbatim for the sizes they cover so that parameter counts match the papers exactly.
TENSOR_SHAPE: dict[int, dict[int, list[int]]] = {
    5: {768: [5, 8, 12, 8], 1024: [4, 8, 5, 8, 4], 4096: [16, 16, 5, 4, 4]},
    8: {768: [8, 8, 12, 8], 1024: [4, 8, 8, 8, 4], 4096: [16, 16, 8, 4, 4]},
    64: {768: [8, 8, 12, 8, 8], 1024: [4, 8, 8, 8, 8, 4], 4096: [16, 16, 16, 4, 4, 4]},
}
CLS_TENSOR_SHAPE: dict[int, list[int]] = {
    768: [8, 8, 12, 12, 8, 8],
    1024: [4, 8, 8, 16, 8, 8, 4],
    4096: [4, 4, 16, 16, 16, 16, 4, 4],
}

MAX_MODE = 64  # a prime factor above this makes a mode so large that TT gains little: refuse it
TARGET_MODE = 8  # balanced factorisation aims at modes of about this size
# Matrix products with fewer than NARROW_COLUMNS output columns are bandwidth-bound and run far below
# their multiply-add count, so the cost model charges them as NARROW_COST columns wide (the measurements
# behind these two numbers are in BENCHMARKS.md, "TT contractions").
NARROW_COLUMNS = 16
NARROW_COST = 40


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, max_mode: int = MAX_MODE, target: int = TARGET_MODE) -> list[int]:
    """Split ``n`` into about ``log_target(n)`` near-equal integer modes, largest first.

    Deterministic: prime factors, largest first, each go to the mode with the smallest product so far.
    Raises ``ValueError`` when ``n`` has a prime factor above ``max_mode`` (e.g. a large prime), since a
    mode that large makes the TT format pointless; pass an explicit shape instead.
    """
    if n < 1:
        raise ValueError(f"cannot factor dimension {n}: it must be a positive integer")
    primes = sorted(_prime_factors(n), reverse=True)
    if primes and primes[0] > max_mode:
        raise ValueError(
            f"cannot factor dimension {n} usefully for a TT matrix: it has the prime factor {primes[0]} > "
            f"{max_mode}. Give the matrix an explicit shape whose modes multiply to in*out: the config's "
            f"tt_shapes={{'INxOUT': [...]}} or --tt-shapes INxOUT=a,b,..."
        )
    d = max(1, min(len(primes), round(math.log(n) / math.log(target)))) if n > 1 else 1
    modes = [1] * d
    for p in primes:
        modes[modes.index(min(modes))] *= p
    return sorted(modes, reverse=True)


def tt_shape(in_features: int, out_features: int, max_mode: int = MAX_MODE) -> list[int]:
    """Default factor shape of an ``in x out`` TT matrix.

    The reference tables are used verbatim where they apply (same list for ``h -> key`` and ``key -> h``,
    as the LoRETTA package does; the ``key -> h`` direction then has its input boundary inside a mode,
    which the factored contraction handles). Otherwise input and output are factorised separately, so
    the input boundary falls between modes: ``factorize(in) + factorize(out)``.
    """
    if in_features == out_features and in_features in CLS_TENSOR_SHAPE:
        return list(CLS_TENSOR_SHAPE[in_features])
    small, large = sorted((in_features, out_features))
    if small in TENSOR_SHAPE and large in TENSOR_SHAPE[small]:
        return list(TENSOR_SHAPE[small][large])
    try:
        return factorize(in_features, max_mode) + factorize(out_features, max_mode)
    except ValueError as e:
        raise ValueError(f"the {in_features}x{out_features} matrix: {e}") from e


def useful_rank(shape: list[int]) -> int | None:
    """The largest TT rank a matrix of factor ``shape`` can use: at each cut between cores the unfolding has
    rank at most the smaller product of the modes on either side, so a uniform rank above the largest of these
    only adds parameters. None for a single core (no TT rank)."""
    return max((min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))), default=None)


def tt_num_params(shape: list[int], rank: int) -> int:
    """``sum_k r_{k-1} n_k r_k`` with ``r_0 = r_N = 1``."""
    ranks = [1] + [rank] * (len(shape) - 1) + [1]
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


def _chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract consecutive cores into one ``(r_first, prod n, r_last)`` tensor."""
    out = cores[0]
    for core in cores[1:]:
        r0, m, r1 = out.shape
        out = (out.reshape(r0 * m, r1) @ core.reshape(r1, -1)).reshape(r0, m * core.shape[1], core.shape[2])
    return out


def _width(columns: int) -> int:
    """Effective output width of a token-sized matrix product in the cost model (see NARROW_COLUMNS)."""
    return NARROW_COST if columns < NARROW_COLUMNS else columns


def _chain_cost(shape: list[int], ranks: list[int]) -> int:
    """Multiply-adds of ``_chain`` over cores with these modes and ranks (``len(ranks) = len(shape)+1``)."""
    cost, m = 0, shape[0]
    for k in range(1, len(shape)):
        cost += ranks[0] * m * ranks[k] * shape[k] * ranks[k + 1]
        m *= shape[k]
    return cost


class TTMatrix(nn.Module):
    """An ``in x out`` matrix (plus optional bias) in TT format: ``y = x @ W + b``.

    ``trainable=False`` stores cores and bias as buffers: used for frozen copies (e.g. the initial
    adapter that a noise-free start subtracts), which must be saved with the adapter but never trained.
    Initialisation follows the reference code: ``G_k ~ N(0,1)/sqrt(r_k) * sigma^(1/N)`` with
    ``sigma = sqrt(1/(in+out))``, so entries of ``W`` have a Glorot-like std; bias ``U(+-1/sqrt(out))``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        shape: list[int] | None = None,
        *,
        bias: bool = False,
        trainable: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"TT rank must be a positive integer, got {rank}")
        shape = list(shape) if shape is not None else tt_shape(in_features, out_features)
        if math.prod(shape) != in_features * out_features:
            raise ValueError(
                f"TT shape {shape} has product {math.prod(shape)}, but a {in_features} x {out_features} matrix "
                f"needs {in_features * out_features}"
            )
        limit = useful_rank(shape)
        if limit is not None and rank > limit:  # checked before the cores (rank^2 * mode each) are allocated
            raise ValueError(f"TT rank {rank} exceeds {limit}, the most a {in_features}x{out_features} TT matrix of "
                             f"shape {shape} can use (a higher rank only adds parameters); use a TT rank of at "
                             f"most {limit} (--tt-rank)")
        self.in_features, self.out_features, self.rank, self.shape = in_features, out_features, rank, shape
        self.trainable = trainable
        self.ranks = [1] + [rank] * (len(shape) - 1) + [1]
        register = self._register_param if trainable else self.register_buffer
        for k, n in enumerate(shape):
            register(f"core_{k}", torch.empty(self.ranks[k], n, self.ranks[k + 1], device=device))
        register("bias", torch.empty(out_features, device=device) if bias else None)
        self._split = self._find_split()
        self._costs = self._cost_terms()
        self.reset_parameters()

    def _register_param(self, name: str, tensor: torch.Tensor | None) -> None:
        self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core_{k}") for k in range(len(self.shape))]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.core_0.is_meta:
            return
        n = len(self.shape)
        sigma = (1.0 / (self.in_features + self.out_features)) ** 0.5
        for core in self.cores:
            core.normal_().mul_(sigma ** (1.0 / n) / core.shape[2] ** 0.5)
        if self.bias is not None:
            bound = 1.0 / self.out_features**0.5
            self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def zero_last_core(self) -> TTMatrix:
        """Zero the last core (and the bias): ``x W + b`` is then exactly 0 for every ``x``, as LoRA's zero
        ``B``. One zero core suffices; the gradient of that core goes through the other, still random cores,
        so it is not zero (with two zero cores every gradient would be zero). Returns ``self``."""
        self.cores[-1].zero_()
        if self.bias is not None:
            self.bias.zero_()
        return self

    def frozen_copy(self) -> "TTMatrix":
        """A copy whose cores and bias are buffers (saved, never trained)."""
        copy = TTMatrix(self.in_features, self.out_features, self.rank, self.shape, bias=self.bias is not None,
                        trainable=False, device="meta")
        for k, core in enumerate(self.cores):
            copy.register_buffer(f"core_{k}", core.detach().clone())
        if self.bias is not None:
            copy.register_buffer("bias", self.bias.detach().clone())
        return copy

    def num_parameters(self) -> int:
        return tt_num_params(self.shape, self.rank) + (self.out_features if self.bias is not None else 0)

    def to_dense(self) -> torch.Tensor:
        """The full ``in x out`` matrix."""
        return _chain(self.cores).reshape(self.in_features, self.out_features)

    def _find_split(self) -> tuple[int, int] | None:
        """Mode ``k`` containing the end of the input index and the part ``a`` of it that is input.

        ``None`` when the boundary cuts a mode unevenly (e.g. [5, 8, 12, 8] for 768 x 5): only the dense
        contraction applies then.
        """
        prefix = 1
        for k, n in enumerate(self.shape):
            if prefix * n >= self.in_features:
                a, rem = divmod(self.in_features, prefix)
                return (k, a) if rem == 0 and n % a == 0 else None
            prefix *= n
        return None

    def _cost_terms(self) -> dict[str, tuple[int, int]]:
        """Per contraction: (multiply-adds independent of the tokens, multiply-adds per token row).

        Computed once: the shapes never change, and every forward chooses from them.
        """
        terms = {"dense": (_chain_cost(self.shape, self.ranks), self.in_features * _width(self.out_features))}
        if self._split is not None:
            k, a = self._split
            b, r = self.shape[k] // a, self.ranks[k + 1]
            left = _chain_cost(self.shape[: k + 1], self.ranks[: k + 2])
            right = _chain_cost(self.shape[k + 1 :], self.ranks[k + 1 :]) if k + 1 < len(self.shape) else 0
            per_token = self.in_features * _width(b * r) + b * r * _width(self.out_features // b)
            terms["factored"] = (left + right, per_token)
        return terms

    def contraction_costs(self, tokens: int) -> dict[str, int]:
        """Modelled multiply-adds of each available contraction for ``tokens`` input rows."""
        return {mode: fixed + tokens * per_token for mode, (fixed, per_token) in self._costs.items()}

    def choose_contraction(self, tokens: int) -> Contraction:
        costs = self.contraction_costs(tokens)
        return min(costs, key=costs.get)  # type: ignore[return-value]

    def _factored(self, x2d: torch.Tensor) -> torch.Tensor:
        k, a = self._split  # type: ignore[misc]
        cores = self.cores
        r_in, n, r_out = cores[k].shape
        b = n // a
        split = cores[k].reshape(r_in, a, b * r_out)  # mode k = (input part a, output part b)
        left = _chain(cores[:k] + [split]).reshape(self.in_features, b * r_out)
        h = (x2d @ left).reshape(-1, b, r_out)
        if k + 1 < len(cores):
            right = _chain(cores[k + 1 :]).reshape(r_out, -1)
            h = h @ right
        return h.reshape(-1, self.out_features)

    def forward(self, x: torch.Tensor, contraction: Contraction | None = None) -> torch.Tensor:
        """``x @ W + b`` over the last dimension of ``x``; leading dimensions are kept as they are."""
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(self.core_0.dtype)
        contraction = contraction or self.choose_contraction(x2d.shape[0])
        if contraction == "factored":
            if self._split is None:
                raise ValueError(f"TT shape {self.shape} does not split at the input size {self.in_features}")
            y = self._factored(x2d)
        else:
            y = x2d @ self.to_dense()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, shape={self.shape}, "
            f"rank={self.rank}, bias={self.bias is not None}, trainable={self.trainable}"
        )
