"""Per-channel activity statistics: fixed-size counters and the dead / dying / saturated decision.

Pure torch, no Lightning (the callback :class:`~lightning_vis.callbacks.DeadNeuronMonitor`
schedules and logs; the counting and deciding live here, testable on their own).

* :class:`ActivityCounts` holds, for one activation site, fixed-size per-channel counters
  on the device of the activations: how many samples were seen, on how many samples each
  channel fired (any positive output), the sum of each channel's |output| and the number
  of outputs per channel (its mean activation, for the ReDo "dormant" score), and for
  bounded activations how many outputs were in the flat region (saturation).
  :func:`update_activity` adds one batch in place: no host copy, no ``.item()``, nothing
  that grows with the number of batches. Channel = dimension 1 of a tensor of rank >= 2;
  any memory format (``channels_last`` too); half precision outputs are accumulated in
  fp32 / int64.
* :func:`classify_channels` turns one window of counts into decisions (DESIGN "Dead /
  dying channel"): *dead* never fired in the window; *dying* fired on fewer than 1% of
  the samples, or its mean activation is at most 2.5% of the layer's mean (ReDo); a dying
  flag clears only when the firing rate climbs back above 2% (hysteresis); *saturated*
  (bounded activations) at least 99% of its outputs in the flat region.

"Fired" means an output > 0. For the ReLU family that is the rectifier's open side; for
smooth rectifiers (GELU, SiLU, Mish, ELU, Hardswish, leaky ReLU, PReLU) it is the same
test, so a channel whose outputs are never positive counts as dead there too. Pure
squashing functions (tanh, sigmoid, hardtanh other than ReLU6, hardsigmoid) are watched
for saturation only: "dead" has no meaning for them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ActivityAccumulator",
    "ActivityCounts",
    "ChannelStates",
    "classify_channels",
    "flat_region",
    "update_activity",
    "watches_firing",
]

#: Kinds watched for firing (output > 0): the ReLU family and the smooth rectifiers.
_FIRING_KINDS = frozenset({"relu", "relu6", "leaky_relu", "prelu", "elu", "gelu", "silu", "hardswish", "mish"})
#: Kinds whose output never goes below zero: the sum of outputs is the sum of |outputs|.
_NONNEGATIVE = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid"})

_FLAT_REGIONS: dict[str, tuple[float, float]] = {
    # outputs <= lo or >= hi are in the flat region (gradient ~0)
    "relu6": (0.0, 6.0),
    "hardtanh": (-1.0, 1.0),
    "hardsigmoid": (0.0, 1.0),
    "tanh": (-0.99, 0.99),  # |tanh'| = 1 - y^2 < 0.02
    "sigmoid": (0.01, 0.99),  # sigmoid' = y (1 - y) < 0.01
}


def watches_firing(kind: str) -> bool:
    """Whether channels of an activation of this kind can be dead or dying (output > 0 test).

    Example::

        >>> watches_firing("relu"), watches_firing("silu"), watches_firing("tanh")
        (True, True, False)
    """
    return kind in _FIRING_KINDS


def flat_region(kind: str, min_val: float | None = None, max_val: float | None = None) -> tuple[float, float] | None:
    """The flat region of a bounded activation: outputs ``<= lo`` or ``>= hi``; ``None`` if unbounded.

    ``min_val``/``max_val`` override the bounds of ``hardtanh``.

    Example::

        >>> flat_region("relu6"), flat_region("hardtanh", -2.0, 2.0), flat_region("relu")
        ((0.0, 6.0), (-2.0, 2.0), None)
    """
    region = _FLAT_REGIONS.get(kind)
    if region is None:
        return None
    if kind == "hardtanh":
        region = (region[0] if min_val is None else float(min_val), region[1] if max_val is None else float(max_val))
    return region


@dataclass
class ActivityCounts:
    """Fixed-size activity counters of one activation site (one window).

    Attributes:
        kind: the activation's kind (``"relu"``, ``"tanh"``…, see :mod:`lightning_vis.sites`).
        samples: samples seen, ``int64`` scalar tensor.
        elements: outputs seen per channel (samples × positions), ``int64`` scalar tensor.
        fired: ``[C]`` ``int64``: samples on which the channel had any output > 0.
        magnitude: ``[C]`` ``float32``: sum of the channel's |outputs|.
        saturated: ``[C]`` ``int64``: outputs in the flat region (zeros if unbounded).
        region: the flat region ``(lo, hi)``, or ``None`` for unbounded activations.
    """

    kind: str
    samples: torch.Tensor
    elements: torch.Tensor
    fired: torch.Tensor
    magnitude: torch.Tensor
    saturated: torch.Tensor
    region: tuple[float, float] | None = None

    @classmethod
    def zeros(
        cls, channels: int, kind: str = "relu", *, device: torch.device | str | None = None,
        region: tuple[float, float] | None = None,
    ) -> ActivityCounts:  # fmt: skip
        """Empty counters for ``channels`` channels on ``device``.

        Raises:
            ValueError: ``channels`` < 1.

        Example::

            >>> c = ActivityCounts.zeros(4, "relu6")
            >>> c.fired, c.region
            (tensor([0, 0, 0, 0]), (0.0, 6.0))
        """
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"Invalid value for channels={channels!r}. Must be an int >= 1")
        if region is None:
            region = flat_region(kind)
        int64 = dict(dtype=torch.int64, device=device)
        return cls(
            kind=kind,
            samples=torch.zeros((), **int64),
            elements=torch.zeros((), **int64),
            fired=torch.zeros(channels, **int64),
            magnitude=torch.zeros(channels, dtype=torch.float32, device=device),
            saturated=torch.zeros(channels, **int64),
            region=region,
        )

    @property
    def channels(self) -> int:
        return self.fired.numel()

    def reset(self) -> None:
        """Zero every counter in place (a new window)."""
        for t in (self.samples, self.elements, self.fired, self.magnitude, self.saturated):
            t.zero_()

    def pack(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """All counters in one flat tensor ``[2 + 3C]`` (for one collective over ranks)."""
        parts = [self.samples.view(1), self.elements.view(1), self.fired, self.magnitude, self.saturated]
        return torch.cat([p.to(dtype) for p in parts])

    @staticmethod
    def packed_size(channels: int) -> int:
        return 2 + 3 * channels

    def unpack_(self, packed: torch.Tensor) -> ActivityCounts:
        """Overwrite the counters in place from :meth:`pack`'s layout (e.g. summed over ranks)."""
        c = self.channels
        if packed.numel() != self.packed_size(c):
            raise ValueError(
                f"packed counts have {packed.numel()} values, expected {self.packed_size(c)} for {c} channels"
            )
        packed = packed.to(self.fired.device)
        self.samples.copy_(packed[0].round())
        self.elements.copy_(packed[1].round())
        self.fired.copy_(packed[2 : 2 + c].round())
        self.magnitude.copy_(packed[2 + c : 2 + 2 * c])
        self.saturated.copy_(packed[2 + 2 * c :].round())
        return self

    def state(self) -> dict:
        """A CPU copy for checkpoints."""
        return {"kind": self.kind, "region": self.region, "packed": self.pack().cpu()}

    def load_state(self, state: Mapping) -> None:
        self.unpack_(state["packed"])


def update_activity(counts: ActivityCounts, output: torch.Tensor) -> None:
    """Add one batch of an activation's output to ``counts``, in place, on the device.

    The work is that of :class:`ActivityAccumulator` for one site: one pass over the
    output for rectifiers whose outputs are never negative (ReLU, ReLU6), two for the
    signed ones, a few small kernels on ``[N, C]`` partial results, no host sync.

    Args:
        counts: the site's counters (same device as ``output``).
        output: the activation's output ``[N, C, ...]`` (or ``[N, C]``), any dtype and
            memory format. It is only read.

    Raises:
        ValueError: ``output`` has rank < 2 or a channel count other than the counters'.

    Example::

        >>> c = ActivityCounts.zeros(3)
        >>> y = torch.relu(torch.tensor([[[1.0, -1.0], [-1.0, -2.0], [0.5, 0.0]],
        ...                              [[-1.0, -1.0], [-1.0, -2.0], [0.0, 2.0]]]))  # [N=2, C=3, L=2]
        >>> update_activity(c, y)
        >>> int(c.samples), int(c.elements), c.fired.tolist(), c.magnitude.tolist()
        (2, 4, [1, 0, 2], [1.0, 0.0, 2.5])
    """
    acc = ActivityAccumulator()
    acc.add(counts, output)
    acc.flush()


class ActivityAccumulator:
    """Counts several sites' outputs of one forward pass with few kernels.

    :meth:`add` reduces one site's output to per-(sample, channel) values right away
    (the only passes over the activation: for ReLU/ReLU6, whose outputs are never
    negative, one sum over positions in fp32 — "fired on sample n" is "that sum > 0";
    for signed activations a max over positions and a sum of absolute values, without
    materialising ``|x|`` for fp32 outputs; plus the flat-region count for bounded
    ones). Any memory format is reduced in place (``channels_last`` is not copied), and
    no mask is made in the activation's dtype. :meth:`flush` then updates every pending
    site's counters at once: the ``[N, C]`` partials of all sites are concatenated and
    reduced over samples once, and the counters are updated with ``torch._foreach_add_``
    (a handful of kernels per forward instead of ~10 per site). Nothing leaves the
    device; pending partials are ``N × C`` floats per site.

    Example::

        >>> a, b = ActivityCounts.zeros(2), ActivityCounts.zeros(3, "silu")
        >>> acc = ActivityAccumulator()
        >>> acc.add(a, torch.relu(torch.tensor([[1.0, -1.0], [0.0, 2.0]])))
        >>> acc.add(b, torch.tensor([[-1.0, 0.5, -0.2], [-0.1, 0.2, -0.3]]))
        >>> acc.flush()
        >>> a.fired.tolist(), a.magnitude.tolist(), b.fired.tolist(), b.magnitude.tolist()
        ([1, 1], [1.0, 2.0], [0, 2, 0], [1.100000023841858, 0.699999988079071, 0.5])
    """

    def __init__(self) -> None:
        # (device, N) -> pending sites: counts, [N, C] float32 partials, magnitudes or None,
        # saturated counts or None, elements per sample
        self._groups: dict[tuple, list[list]] = {}
        self._ids: dict[tuple, set[int]] = {}

    def add(self, counts: ActivityCounts, output: torch.Tensor) -> None:
        """Reduce one site's output ``[N, C, ...]`` now; its counters are updated at :meth:`flush`.

        Raises:
            ValueError: ``output`` has rank < 2 or a channel count other than the counters'.
        """
        if output.ndim < 2:
            raise ValueError(f"Expected an activation of shape [N, C, ...], got shape {tuple(output.shape)}")
        if output.shape[1] != counts.channels:
            raise ValueError(f"Activation has {output.shape[1]} channels, the counters {counts.channels}")
        key = (output.device, output.shape[0])
        ids = self._ids.setdefault(key, set())
        if id(counts) in ids:  # the same counters twice in one batched update would race
            self._flush_group(key)
            ids = self._ids.setdefault(key, set())
        with torch.no_grad():
            x = output
            spatial = tuple(range(2, x.ndim))
            per_channel = math.prod(x.shape[2:])
            magnitude = None
            if counts.kind in _NONNEGATIVE:
                # outputs >= 0: "any output > 0" <=> "sum over positions > 0"; one pass gives both
                partial = x.sum(dim=spatial, dtype=torch.float32) if spatial else x.float()
            else:
                peak = x.amax(dim=spatial) if spatial else x
                partial = peak.float()
                if x.dtype in (torch.float32, torch.float64):
                    magnitude = torch.linalg.vector_norm(x, 1, dim=(0, *spatial), dtype=torch.float32)
                else:  # reduced precision: |x| in its dtype (exact), summed in fp32 inside the kernel
                    magnitude = x.abs().sum(dim=(0, *spatial), dtype=torch.float32)
            saturated = None
            if counts.region is not None:
                lo, hi = counts.region
                saturated = (x <= lo).logical_or_(x >= hi).sum(dim=(0, *spatial))
        ids.add(id(counts))
        self._groups.setdefault(key, []).append([counts, partial, magnitude, saturated, per_channel])

    def flush(self) -> None:
        """Add everything pending to the counters (in place, on the device)."""
        for key in list(self._groups):
            self._flush_group(key)

    def clear(self) -> None:
        """Drop everything pending without counting it."""
        self._groups.clear()
        self._ids.clear()

    def _flush_group(self, key: tuple) -> None:
        pending = self._groups.pop(key, [])
        self._ids.pop(key, None)
        if not pending:
            return
        n = key[1]
        counts = [p[0] for p in pending]
        with torch.no_grad():
            partials = [p[1] for p in pending]
            joined = torch.cat(partials, dim=1) if len(partials) > 1 else partials[0]
            sizes = [t.shape[1] for t in partials]
            fired = (joined > 0).sum(dim=0).split(sizes)
            torch._foreach_add_([c.fired for c in counts], list(fired))
            if any(p[2] is None for p in pending):
                sums = joined.sum(dim=0).split(sizes)
                mags = [s if p[2] is None else p[2] for p, s in zip(pending, sums)]
            else:
                mags = [p[2] for p in pending]
            torch._foreach_add_([c.magnitude for c in counts], mags)
            torch._foreach_add_([c.samples for c in counts], n)
            torch._foreach_add_([c.elements for c in counts], [n * p[4] for p in pending])
            bounded = [p for p in pending if p[3] is not None]
            if bounded:
                torch._foreach_add_([p[0].saturated for p in bounded], [p[3] for p in bounded])


@dataclass
class ChannelStates:
    """Decisions for one site after one window (CPU tensors, one entry per channel).

    Attributes:
        rate: firing rate: fraction of samples with any positive output.
        score: ReDo dormant score: mean |activation| / the layer's mean of it.
        saturation: fraction of outputs in the flat region (0 for unbounded kinds).
        dead: never fired in the window.
        dying: flagged dying (not dead), hysteresis applied.
        saturated: at least ``saturation_fraction`` of outputs in the flat region (not dead).
        nonfinite: the channel produced NaN or inf outputs: no decision is made for it
            (NaN > 0 is False, so it would otherwise look dead).
    """

    rate: torch.Tensor
    score: torch.Tensor
    saturation: torch.Tensor
    dead: torch.Tensor
    dying: torch.Tensor
    saturated: torch.Tensor
    nonfinite: torch.Tensor

    @property
    def flagged(self) -> torch.Tensor:
        """Dead or dying: the state the next window's hysteresis starts from."""
        return self.dead | self.dying

    @property
    def dead_fraction(self) -> float:
        return int(self.dead.sum()) / self.dead.numel() if self.dead.numel() else 0.0


def classify_channels(
    counts: ActivityCounts,
    previous: torch.Tensor | None = None,
    *,
    dying_rate: float = 0.01,
    revive_rate: float = 0.02,
    dormant: float = 0.025,
    saturation: float = 0.99,
) -> ChannelStates:
    """Dead, dying and saturated channels from one window of counts (DESIGN definitions).

    Args:
        counts: the window's counters (summed over ranks).
        previous: ``[C]`` bool, channels flagged dead or dying after the previous window
            (:attr:`ChannelStates.flagged`), for the hysteresis; ``None`` at the first window.
        dying_rate: dying when the firing rate is below this.
        revive_rate: a flagged channel stays dying until its rate is above this.
        dormant: dying when the mean |activation| is at most this fraction of the layer's.
        saturation: saturated when at least this fraction of outputs is in the flat region.

    Returns:
        :class:`ChannelStates`. For kinds that are not watched for firing (tanh,
        sigmoid…), ``dead`` and ``dying`` are all False. With no samples, nothing is
        flagged.

    Raises:
        ValueError: thresholds out of range, or ``previous`` of the wrong shape.

    Example::

        >>> c = ActivityCounts.zeros(4)
        >>> c.samples, c.elements = torch.tensor(1000), torch.tensor(1000 * 16)
        >>> c.fired = torch.tensor([0, 5, 15, 600])  # dead, dying, healthy sparse, busy
        >>> c.magnitude = torch.tensor([0.0, 30.0, 400.0, 9000.0])
        >>> s = classify_channels(c)
        >>> s.dead.tolist(), s.dying.tolist(), [round(r, 3) for r in s.rate.tolist()]
        ([True, False, False, False], [False, True, False, False], [0.0, 0.005, 0.015, 0.6])

        A channel flagged before stays dying until its rate climbs above 2%:

        >>> classify_channels(c, previous=torch.tensor([False, False, True, False])).dying.tolist()
        [False, True, True, False]
    """
    for name, value in (("dying_rate", dying_rate), ("revive_rate", revive_rate), ("dormant", dormant),
                        ("saturation", saturation)):  # fmt: skip
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"Invalid value for {name}={value!r}. Must be in [0, 1]")
    if revive_rate < dying_rate:
        raise ValueError(f"revive_rate={revive_rate} must be >= dying_rate={dying_rate} (hysteresis)")
    c = counts.channels
    if previous is not None and tuple(previous.shape) != (c,):
        raise ValueError(f"previous must have shape ({c},), got {tuple(previous.shape)}")
    samples = counts.samples.detach().double().cpu()
    elements = counts.elements.detach().double().cpu()
    fired = counts.fired.detach().double().cpu()
    rate = (fired / samples.clamp_min(1)).float()
    mean = counts.magnitude.detach().double().cpu() / elements.clamp_min(1)
    nonfinite = ~torch.isfinite(mean)
    mean = torch.where(nonfinite, torch.zeros_like(mean), mean)
    layer_mean = mean.mean()
    score = torch.where(layer_mean > 0, mean / layer_mean.clamp_min(1e-30), torch.zeros_like(mean)).float()
    sat = (counts.saturated.detach().double().cpu() / elements.clamp_min(1)).float()
    no = torch.zeros(c, dtype=torch.bool)
    seen = bool(samples > 0)
    if seen and watches_firing(counts.kind):
        dead = fired == 0
        dying = (rate < dying_rate) | (score <= dormant)
        if previous is not None:
            dying = dying | (previous.cpu().bool() & (rate <= revive_rate))
        dead = dead & ~nonfinite
        dying = dying & ~dead & ~nonfinite
    else:
        dead, dying = no.clone(), no.clone()
    saturated = (sat >= saturation) & ~dead if seen and counts.region is not None else no.clone()
    return ChannelStates(rate=rate, score=score, saturation=sat, dead=dead, dying=dying, saturated=saturated,
                         nonfinite=nonfinite)  # fmt: skip
