"""The random numbers of zeroth-order training, drawn from seeds so that none is ever stored.

A query's numbers are a function of (query seed, stream, position): the trainable tensors are laid end to
end, per device, into one virtual vector, cut into blocks of ``BLOCK`` elements, and block ``k`` of stream
``s`` is drawn by a generator seeded with ``mix(seed, s, device group, k)``. So

* any slice of any tensor can be drawn on its own (a module's weights inside its forward, one chunk of a
  large tensor at a time): no full-size temporary exists, and peak memory stays at inference's;
* the numbers do not depend on how a loop walks the tensors, on the process count, or on a resume;
* small tensors share a block: a LoRA or TT adapter set costs one or two generator seedings per pass
  (a generator per tensor would cost more than the draws for hundreds of TT cores).

Directions are ``N(0, 1)`` (``GAUSSIAN``, MeZO's) or ``+-1`` with equal odds (``RADEMACHER``, as cheap to
draw as random bytes: ``E[z z^T] = I`` as for the Gaussian, so SPSA stays unbiased). Stochastic rounding
draws ``UNIFORM`` numbers (float16) or 16 random bits per element (``BITS16``: bfloat16's integer form,
``engine.ZOEngine._round_into``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 1 << 18
GAUSSIAN, RADEMACHER, UNIFORM, BITS16 = "gaussian", "rademacher", "uniform", "bits16"
DIRECTIONS = (GAUSSIAN, RADEMACHER)
# streams of a query
Z, ROUND_PLUS, ROUND_MINUS, ROUND_UPDATE, LOW_RANK_U, LOW_RANK_V = range(6)
_M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*keys: int) -> int:
    """A 64-bit generator seed from integer keys (SplitMix64 over each in turn): cheap, and distinct keys
    give unrelated seeds."""
    h = 0
    for key in keys:
        h = _splitmix(h ^ (key & _M64))
    return h


def generator(device: torch.device) -> torch.Generator:
    """A generator for ``device``; a CPU one for the meta device, which has none (meta numbers are shapes
    only: the memory estimate runs the engine on a meta model)."""
    return torch.Generator(device="cpu" if device.type == "meta" else device)


def draw(kind: str, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` numbers of ``kind`` from ``generator`` (float32, or int32 for ``BITS16``)."""
    if kind == GAUSSIAN:
        return torch.randn(n, generator=generator, device=device)
    if kind == UNIFORM:
        return torch.rand(n, generator=generator, device=device)
    if kind == RADEMACHER:  # the sign of random bytes: 128 of the 256 values are negative
        return _bytes(n, generator, device).view(torch.int8).float().add_(0.5).sign_()
    if kind == BITS16:
        return _bytes(2 * n, generator, device).view(torch.uint16).to(torch.int32)
    raise ValueError(f"unknown kind of random numbers {kind!r}; one of {GAUSSIAN}, {RADEMACHER}, {UNIFORM}, {BITS16}")


def _bytes(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` random bytes (uint8), drawn as 64-bit words: the cheapest bits torch's generators give (every bit
    random; ``random_()`` on int64 would leave the top bit 0)."""
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 7) // 8,), dtype=torch.int64, generator=generator,
                          device=device)
    return words.view(torch.uint8)[:n]


class Noise:
    """Random numbers keyed by (seed, stream, element of the trainable tensors ``params``); see the module
    docstring. The last few blocks drawn are kept, so drawing a slice and then its neighbour, or the same
    slice for two purposes in a row, draws each block once."""

    CACHE = 4

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.devices: list[torch.device] = []
        self.sizes: list[int] = []
        self.where: list[tuple[int, int]] = []  # per tensor: (device group, offset in the group's vector)
        for p in params:
            if p.device not in self.devices:
                self.devices.append(p.device)
                self.sizes.append(0)
            group = self.devices.index(p.device)
            self.where.append((group, self.sizes[group]))
            self.sizes[group] += p.numel()
        self.generators = [generator(d) for d in self.devices]
        self.numels = [p.numel() for p in params]
        self.cache: OrderedDict = OrderedDict()

    def pieces(self, i: int) -> list[tuple[int, int]]:
        """Tensor ``i``'s flat elements as ``[(a, b)]`` slices, each inside one block."""
        _, offset = self.where[i]
        n, out, a = self.numels[i], [], 0
        while a < n:
            b = min(n, (offset + a) // BLOCK * BLOCK + BLOCK - offset)
            out.append((a, b))
            a = b
        return out

    def block(self, seed: int, stream: int, kind: str, group: int, k: int) -> torch.Tensor:
        key = (seed, stream, kind, group, k)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        n = min(BLOCK, self.sizes[group] - k * BLOCK)
        seeded = self.generators[group].manual_seed(mix(seed, stream, group, k))
        self.cache[key] = out = draw(kind, n, seeded, self.devices[group])
        if len(self.cache) > self.CACHE:
            self.cache.popitem(last=False)
        return out

    def draw(self, seed: int, stream: int, kind: str, i: int, a: int, b: int) -> torch.Tensor:
        """Elements ``a:b`` of tensor ``i``'s numbers (a slice within one block: see ``pieces``)."""
        group, offset = self.where[i]
        k = (offset + a) // BLOCK
        start = offset + a - k * BLOCK
        return self.block(seed, stream, kind, group, k)[start:start + b - a]

    def full(self, seed: int, stream: int, kind: str, i: int) -> torch.Tensor:
        """All of tensor ``i``'s numbers, joined (a test's or a small tensor's view)."""
        parts = [self.draw(seed, stream, kind, i, a, b) for a, b in self.pieces(i)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.devices[self.where[i][0]])


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """``value`` (float32) rounded to ``dtype`` up or down at random, with ``E[result] = value``.

    Each element goes to the nearest representable number, or to the neighbour on ``value``'s other side
    with probability ``|value - nearest| / |neighbour - nearest|``, decided by ``uniform`` (U[0, 1) of
    ``value``'s shape). Rounding to nearest would drop every change below half a unit in the last place:
    in bfloat16, adding 1e-3 to 1.0 does nothing.
    """
    if dtype == torch.float32:
        return value.clone()
    nearest = value.to(dtype)
    toward = torch.where(value > nearest.float(), float("inf"), float("-inf")).to(dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.float() - nearest.float()
    p = torch.where(gap != 0, (value - nearest.float()) / gap, torch.zeros_like(value))
    return torch.where(uniform < p, neighbour, nearest)
