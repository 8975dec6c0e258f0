"""``DeadNeuronMonitor``: dead and dying channels caught early, on the training batches themselves."""

from __future__ import annotations

import fnmatch
import math
import threading
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_vis import render
from lightning_vis.callbacks._base import _VisMonitor, as_pattern_list, check_every
from lightning_vis.layers import conv_layers, resolve_layers, unwrap_model
from lightning_vis.sites import (
    ActivationCall,
    Site,
    find_activation_sites,
    hardtanh_bounds,
    intercept_activations,
    name_sites,
)
from lightning_vis.stats import (
    ActivityAccumulator,
    ActivityCounts,
    ChannelStates,
    classify_channels,
    flat_region,
    watches_firing,
)

__all__ = ["DeadNeuronMonitor"]

#: Images a default window covers: a channel firing on 0.5% of images is missed with
#: probability (1 - 0.005) ** 2048 < 1e-4.
WINDOW_IMAGES = 2048
_MAX_LISTED = 32


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid value for {name}={value!r}. Must be a number in [0, 1)")
    return float(value)


def _listed(channels: list[int]) -> str:
    shown = ", ".join(str(c) for c in channels[:_MAX_LISTED])
    return shown + (f", … ({len(channels) - _MAX_LISTED} more)" if len(channels) > _MAX_LISTED else "")


class DeadNeuronMonitor(_VisMonitor):
    """Count every channel's activity on the training batches and flag dead and dying channels.

    Activation sites (every call of an activation during the forward, module or
    functional, named per DESIGN: ``net.features.1``, ``layer1.0.relu#1``, ``block#0``)
    are found on a real forward pass at the start of training (the first images of the
    validation, else training, data; or the first training batch). On every
    ``every_n_steps``-th optimizer step the training batch's own forward is watched (no
    extra forward pass): each site's output is counted on the device into fixed-size
    per-channel counters (:mod:`lightning_vis.stats`), without a host sync. After
    ``window`` sampled batches the counts are summed over ranks and decided:

    * *dead*: the channel never had a positive output on any sample of the window;
    * *dying*: it fired on fewer than 1% of the samples, or its mean activation is at
      most 2.5% of the layer's mean (ReDo "dormant"); the flag clears only once its
      firing rate is back above 2%;
    * *saturated* (bounded activations: ReLU6, hardtanh, tanh, sigmoid, hardsigmoid):
      at least 99% of its outputs in the flat region.

    What is watched: the ReLU family and the smooth rectifiers (GELU, SiLU, Mish, ELU,
    Hardswish, leaky ReLU, PReLU) for firing, "fired" meaning an output > 0 (for the
    smooth ones a channel whose outputs are never positive counts as dead); tanh,
    sigmoid, hardtanh, hardsigmoid and ReLU6 for saturation. A model without any of
    these gets one warning and nothing is monitored.

    After each window: :attr:`dead_channels`, :attr:`dying_channels`,
    :attr:`saturated_channels` (site -> channel indices), :attr:`activity` (site ->
    per-channel firing rate), :attr:`states` (site -> :class:`~lightning_vis.stats.ChannelStates`).
    A partial window at the end of training is not decided (it is kept in the
    checkpoint, so a resumed run completes it).

    **Logged** (scalars to every logger, the rest to TensorBoard, on global rank 0), at
    the end of each window:

    * ``dead/<site>``: fraction of the site's channels that are dead;
      ``dead/total``: over all watched channels;
    * ``dead/dying/<site>``, ``dead/saturated/<site>`` (bounded activations): fractions;
    * ``dead/activity``: image, sites × channels firing-rate heatmap (log scale, dead in red);
    * ``dead/rates/<site>``: histogram of the site's firing rates;
    * ``dead/alert``: text, when a site's dead fraction passes ``alert_fraction``
      (together with one warning naming the site, the channels and the step).

    Args:
        layers: site names or glob patterns to watch (``"net.features.*"``); a module
            name that owns several sites (``"layer1.0.relu"``) selects all of them
            (``layer1.0.relu#0``, ``#1``); the name of a convolution selects the sites it
            feeds (``"conv1"`` for ``conv1 → forward#0``); ``None``: every site.
        every_n_steps: count on the training batch of every this many optimizer steps.
            The default aims at DESIGN's budget of 1% of step time: on CPU proxies
            (``benchmarks/cpu_proxies.py``) counting costs about 0.4% amortised on the demo
            CNN and 0.2% on resnet18, window ends included; whole-step comparisons on a
            shared 2-core machine measured 1.1-1.7%, within its noise. Not yet measured on
            a GPU (``benchmarks/gpu.py``).
        window: sampled batches per decision; ``None``: enough to cover about 2,048
            images (``ceil(2048 / (batch size × world size))``, set at the first sampled batch).
        alert_fraction: alert when a site's dead fraction passes (exceeds) this.
        stop_on_dead: stop training (``trainer.should_stop``) at an alert, like ``EarlyStopping``.
        dying_rate: firing rate below which a channel is dying.
        revive_rate: firing rate a dying channel must exceed to clear its flag.
        dormant: dying when the mean activation is at most this fraction of the layer's.
        saturation: saturated when at least this fraction of outputs is in the flat region.
        heatmap: log the ``dead/activity`` image.
        histograms: log the ``dead/rates/<site>`` histograms.

    Raises:
        ValueError: bad argument values (here); at the start of training, ``layers``
            that match no activation site (the message lists the sites).

    Example::

        >>> from lightning_vis.callbacks import DeadNeuronMonitor
        >>> DeadNeuronMonitor(layers="net.features.*", alert_fraction=0.3)
        DeadNeuronMonitor(layers=['net.features.*'], every_n_steps=5, window=None, alert_fraction=0.3)
    """

    def __init__(
        self,
        layers: str | list[str] | None = None,
        every_n_steps: int = 5,
        window: int | None = None,
        alert_fraction: float = 0.25,
        stop_on_dead: bool = False,
        *,
        dying_rate: float = 0.01,
        revive_rate: float = 0.02,
        dormant: float = 0.025,
        saturation: float = 0.99,
        heatmap: bool = True,
        histograms: bool = True,
    ) -> None:
        super().__init__()
        self.layers = as_pattern_list(layers)
        self.every_n_steps = check_every("every_n_steps", every_n_steps, allow_none=False)
        self.window = check_every("window", window)
        self.alert_fraction = _fraction("alert_fraction", alert_fraction)
        if not isinstance(stop_on_dead, bool):
            raise TypeError(f"stop_on_dead must be True or False, got {stop_on_dead!r}")
        self.stop_on_dead = stop_on_dead
        self.dying_rate = _fraction("dying_rate", dying_rate)
        self.revive_rate = _fraction("revive_rate", revive_rate)
        if self.revive_rate < self.dying_rate:
            raise ValueError(
                f"Invalid value for revive_rate={revive_rate!r}. Must be >= dying_rate={dying_rate!r} (hysteresis)"
            )
        self.dormant = _fraction("dormant", dormant)
        if isinstance(saturation, bool) or not isinstance(saturation, (int, float)) or not 0.0 < saturation <= 1.0:
            raise ValueError(f"Invalid value for saturation={saturation!r}. Must be a number in (0, 1]")
        self.saturation = float(saturation)
        self.heatmap = bool(heatmap)
        self.histograms = bool(histograms)
        self._reset_run_state()
        # results of the last completed window
        self.dead_channels: dict[str, list[int]] = {}
        self.dying_channels: dict[str, list[int]] = {}
        self.saturated_channels: dict[str, list[int]] = {}
        self.activity: dict[str, torch.Tensor] = {}
        self.states: dict[str, ChannelStates] = {}
        #: every alert raised: dicts with ``step``, ``site``, ``fraction``, ``channels``.
        self.alerts: list[dict[str, Any]] = []
        self.windows_completed = 0
        #: the step at which ``stop_on_dead`` stopped training, if it did.
        self.stopped_step: int | None = None
        self._flagged: dict[str, torch.Tensor] = {}
        self._alerted: set[str] = set()
        self._window_size: int | None = None
        self._window_batches = 0
        self._pending: dict[str, Any] | None = None

    def _reset_run_state(self) -> None:
        """What lives only while fitting (not pickled, not saved)."""
        self._root: torch.nn.Module | None = None
        self._sites: list[Site] = []
        self._counts: dict[tuple, ActivityCounts] = {}
        self._ctx: Any = None
        self._discovering = False
        self._discovered: dict[tuple, tuple[str, tuple[int, ...], str | None]] = {}
        self._known: dict[tuple, str] = {}  # every site key seen so far -> its name
        self._late: dict[tuple, tuple[str, tuple[int, ...], str | None]] = {}  # first seen during training
        self._late_sites: list[Site] = []  # waiting for the next window
        self._batch_size: int | None = None
        self._conv_channels: dict[str, int] = {}
        self._counting_batch = False
        self._acc = ActivityAccumulator()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers!r}, every_n_steps={self.every_n_steps}, "
            f"window={self.window}, alert_fraction={self.alert_fraction})"
        )

    def _config(self) -> dict:
        return {
            "layers": self.layers,
            "every_n_steps": self.every_n_steps,
            "window": self.window,
            "alert_fraction": self.alert_fraction,
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_root=None, _ctx=None, _counts={}, _sites=[], _discovered={}, _known={}, _late={}, _late_sites=[])
        state.update(_drawing=None, _drawing_error=None)
        for bound in ("log", "log_dict"):  # Lightning binds the module's log methods to callbacks during fit
            state.pop(bound, None)
        return state

    # ------------------------------------------------------------------ public lookups
    @property
    def sites(self) -> list[str]:
        """Names of the watched activation sites (known once training has started)."""
        return [s.name for s in self._sites]

    def dead_filters(self, layer: str) -> list[int]:
        """Filters of convolution ``layer`` whose output channels were dead in the last window.

        Used by :class:`~lightning_vis.callbacks.FilterGrid` to mark them: the dead channels
        of the sites fed directly by ``layer`` (same channel count).
        """
        dead: set[int] = set()
        out_channels = self._conv_channels.get(layer)
        for site in self._sites:
            if site.conv == layer and site.channels == out_channels:
                dead.update(self.dead_channels.get(site.name, ()))
        return sorted(dead)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._check_loggers(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._reset_run_state()
        root = unwrap_model(pl_module)
        self._root = root
        self._conv_channels = {
            name: m.out_channels for name, m in conv_layers(root).items() if hasattr(m, "out_channels")
        }
        example = self._sample_images(trainer, pl_module, 2)
        sites = None
        if example is not None and self._probe_runs(pl_module, example):
            sites = find_activation_sites(
                root, self._to_model(pl_module, example), forward=self._forward_fn(pl_module)
            )
        if sites is None:
            self._discovering = True
            return
        self._init_sites(trainer, sites)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._exit()
        if self._root is None:
            return
        self._counting_batch = False
        if self._discovering:
            self._counting_batch = self._step_due(trainer, self.every_n_steps)
        elif self._counts and self._step_due(trainer, self.every_n_steps):
            self._counting_batch = True
        else:
            return
        if self._counting_batch:
            self._last_step = trainer.global_step
        self._ctx = intercept_activations(self._root, self._handle)
        self._ctx.__enter__()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        # the forward is over: stop intercepting before backward and optimizer step
        self._exit()
        if self._discovering:
            self._finish_discovery(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._exit()
        if self._late:
            self._adopt_late()
        if self._discovering:
            self._finish_discovery(trainer)
        if not self._counting_batch:
            return
        self._counting_batch = False
        if not self._counts:
            return
        self._window_batches += 1
        if self._window_size is None:
            self._window_size = self.window or self._default_window(trainer)
        if self._window_batches >= self._window_size:
            self._end_window(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._exit()
        self._finish_drawing()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._exit()
        self._finish_drawing()
        if self.windows_completed == 0 and self._window_size:
            self._warn_once(
                "no-window",
                f"DeadNeuronMonitor: training ended before the first window was complete "
                f"({self._window_batches} of {self._window_size} sampled batches, one every {self.every_n_steps} "
                "steps), so nothing was decided or logged. Pass a smaller window= or every_n_steps= "
                "for short runs.",
            )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._exit()
        self._finish_drawing()
        self._root = None

    # ------------------------------------------------------------------ counting
    def _exit(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        self._acc.flush()

    def _handle(self, call: ActivationCall) -> torch.Tensor:
        out = call.run()
        root = self._root
        if root is None or not root.training or not isinstance(out, torch.Tensor):
            return out  # probe passes of other callbacks run in eval mode: not counted
        counts = self._counts.get(call.key)
        if counts is None:
            if not self._discovering:  # a site first seen now (e.g. a head called in training_step)
                if out.ndim >= 2 and call.key not in self._known and call.key not in self._late:
                    self._late[call.key] = (call.kind, tuple(out.shape), call.last_conv)
                return out
            if out.ndim < 2 or call.key in self._discovered:
                return out
            self._discovered[call.key] = (call.kind, tuple(out.shape), call.last_conv)
            if not self._counting_batch:
                return out
            counts = self._counts[call.key] = ActivityCounts.zeros(out.shape[1], call.kind, device=out.device)
        if out.ndim < 2 or out.shape[1] != counts.channels:
            self._warn_once(
                f"shape-{call.key}",
                f"DeadNeuronMonitor: an activation of {counts.channels} channels now has shape "
                f"{tuple(out.shape)}; such calls are not counted",
            )
            return out
        if counts.kind == "hardtanh":
            counts.region = flat_region("hardtanh", *hardtanh_bounds(call.args, call.kwargs))
        self._acc.add(counts, out)  # reduced now; the counters are updated once per forward (_exit)
        if self._batch_size is None:
            self._batch_size = int(out.shape[0])
        return out

    def _finish_discovery(self, trainer: Any) -> None:
        self._discovering = False
        keys = list(self._discovered)
        names = name_sites(keys)
        sites = []
        for key in keys:
            kind, shape, conv = self._discovered[key]
            sites.append(Site(names[key], key, kind, shape[1], shape, conv))
        counted = self._counts
        self._discovered = {}
        self._init_sites(trainer, sites, counted=counted)

    def _init_sites(self, trainer: Any, sites: list[Site], counted: dict | None = None) -> None:
        self._known = {s.key: s.name for s in sites}
        watched = [s for s in sites if len(s.shape) >= 2 and (watches_firing(s.kind) or flat_region(s.kind))]
        chosen = watched
        if self.layers is not None:
            chosen = self._select(watched)
        self._sites = chosen
        if not chosen:
            self._counts = {}
            self._warn_once(
                "nothing",
                f"DeadNeuronMonitor: {type(self._root).__name__} calls no activation that can be watched "
                "(ReLU family, GELU/SiLU/Mish/ELU/Hardswish, tanh/sigmoid/hardtanh) inside its modules' "
                "forward; nothing is monitored",
            )
            return
        device = next((p.device for p in self._root.parameters()), torch.device("cpu"))
        counts = {}
        for s in chosen:
            if counted and s.key in counted:
                counts[s.key] = counted[s.key]
            else:
                counts[s.key] = ActivityCounts.zeros(s.channels, s.kind, device=device)
        self._counts = counts
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def _adopt_late(self) -> None:
        """Sites first seen during training (outside ``forward``): named by the same rules, watched
        from the next window on (a window's decisions always cover whole windows)."""
        late, self._late = self._late, {}
        names = name_sites([*self._known, *late])
        taken = set(self._known.values())
        found = []
        for key, (kind, shape, conv) in late.items():
            name = names[key]
            if name in taken:  # a module reused outside forward: keep the earlier names stable
                name = f"{key[1] or 'forward'}#{key[2]}"
            taken.add(name)
            self._known[key] = name
            found.append(Site(name, key, kind, shape[1], shape, conv))
        watched = [s for s in found if watches_firing(s.kind) or flat_region(s.kind)]
        if self.layers is not None:
            watched = self._select(watched, strict=False)
        if not watched:
            return
        self._warn_once(
            "late-sites",
            "DeadNeuronMonitor: activation sites first seen during training, outside forward() (e.g. a head "
            f"called in training_step): {', '.join(repr(s.label) for s in watched)}; watched from the next window",
        )
        if self._counts:
            self._late_sites.extend(watched)
        else:
            self._install(watched)

    def _install(self, sites: list[Site]) -> None:
        device = next((p.device for p in self._root.parameters()), torch.device("cpu"))
        for site in sites:
            self._counts[site.key] = ActivityCounts.zeros(site.channels, site.kind, device=device)
        self._sites = [*self._sites, *sites]

    def _select(self, watched: list[Site], *, strict: bool = True) -> list[Site]:
        """The sites ``layers`` names: site names, globs, or the convolution feeding a site.

        ``"layer1.0.relu"`` selects its calls ``#0``, ``#1``…; ``"conv1"`` selects the
        sites that ``conv1`` feeds (``conv1 → forward#0``). ``strict=False`` (sites first
        seen during training) ignores patterns that match nothing.
        """
        names = [s.name for s in watched]
        feeds: dict[str, list[str]] = {}
        for site in watched:
            if site.conv:
                feeds.setdefault(site.conv, []).append(site.name)
        picked: set[str] = set()
        for pattern in self.layers or []:
            if pattern not in names and "#" not in pattern and any(n.startswith(pattern + "#") for n in names):
                pattern += "#*"
            try:
                picked.update(resolve_layers(self._root, pattern, names, what="activation sites"))
                continue
            except ValueError as err:
                convs = [c for c in feeds if fnmatch.fnmatchcase(c, pattern)]
                if convs:
                    picked.update(n for c in convs for n in feeds[c])
                    continue
                if not strict:
                    continue
                listed = ", ".join(f"'{s.label}'" for s in watched[:40]) or "(none)"
                raise ValueError(
                    f"DeadNeuronMonitor: {pattern!r} names no activation site of {type(self._root).__name__} "
                    f"and no convolution that feeds one; sites (convolution → site) are: {listed}"
                ) from err
        return [s for s in watched if s.name in picked]

    def _default_window(self, trainer: Any) -> int:
        batch = self._batch_size or 1
        world = max(1, int(getattr(trainer, "world_size", 1) or 1))
        return max(1, math.ceil(WINDOW_IMAGES / (batch * world)))

    # ------------------------------------------------------------------ deciding
    def _end_window(self, trainer: Any) -> None:
        sites = self._sites
        counts = [self._counts[s.key] for s in sites]
        dtype = torch.float32 if counts[0].fired.device.type == "mps" else torch.float64
        packed = torch.cat([c.pack(dtype) for c in counts])
        packed = trainer.strategy.reduce(packed, reduce_op="sum")  # every rank, one collective
        packed = packed.cpu()  # one device-to-host copy (one sync) per window, not several per site
        summed = []
        offset = 0
        for c in counts:
            size = ActivityCounts.packed_size(c.channels)
            host = ActivityCounts.zeros(c.channels, c.kind, device="cpu", region=c.region)
            summed.append(host.unpack_(packed[offset : offset + size]))
            offset += size
        with torch.no_grad():  # a new window: every device counter zeroed in one batched call
            tensors = [t for c in counts for t in (c.samples, c.elements, c.fired, c.magnitude, c.saturated)]
            torch._foreach_zero_(tensors)
        self._window_batches = 0
        self.windows_completed += 1
        states = {}
        for site, c in zip(sites, summed):
            states[site.name] = classify_channels(
                c, self._flagged.get(site.name), dying_rate=self.dying_rate, revive_rate=self.revive_rate,
                dormant=self.dormant, saturation=self.saturation,
            )  # fmt: skip
        self._decide(trainer, states)
        if self._late_sites:
            pending, self._late_sites = self._late_sites, []
            self._install(pending)

    def _decide(self, trainer: Any, states: dict[str, ChannelStates]) -> None:
        step = trainer.global_step
        kinds = {s.name: s.kind for s in self._sites}
        firing = [n for n in states if watches_firing(kinds[n])]
        self.states = states
        self._flagged = {n: s.flagged for n, s in states.items()}
        self.dead_channels = {n: states[n].dead.nonzero().flatten().tolist() for n in firing}
        self.dying_channels = {n: states[n].dying.nonzero().flatten().tolist() for n in firing}
        self.saturated_channels = {
            n: s.saturated.nonzero().flatten().tolist() for n, s in states.items() if flat_region(kinds[n])
        }
        self.activity = {n: states[n].rate for n in firing}
        broken = [n for n, st in states.items() if bool(st.nonfinite.any())]
        if broken:
            self._warn_once(
                "nonfinite",
                f"DeadNeuronMonitor at step {step}: sites {', '.join(map(self._label, broken))} produced NaN or inf "
                "activations "
                "(training has diverged?); their non-finite channels are not called dead",
            )

        metrics: dict[str, float] = {}
        for n in firing:
            metrics[f"dead/{n}"] = states[n].dead_fraction
            metrics[f"dead/dying/{n}"] = float(states[n].dying.float().mean())
        for n in self.saturated_channels:
            metrics[f"dead/saturated/{n}"] = float(states[n].saturated.float().mean())
        total = sum(states[n].dead.numel() for n in firing)
        if total:
            metrics["dead/total"] = sum(len(self.dead_channels[n]) for n in firing) / total
        self._log_scalars(trainer, metrics, step)

        new_alerts = []
        for n in firing:
            fraction = states[n].dead_fraction
            if fraction > self.alert_fraction:
                if n not in self._alerted:
                    self._alerted.add(n)
                    new_alerts.append({"step": step, "site": n, "fraction": fraction,
                                       "channels": list(self.dead_channels[n])})  # fmt: skip
            else:
                self._alerted.discard(n)  # re-armed: a later relapse alerts again
        if new_alerts:
            self.alerts.extend(new_alerts)
            self._alert(trainer, new_alerts, step)

        if self._writers(trainer) and (self.heatmap or self.histograms) and self.activity:
            labels = {s.name: s.label for s in self._sites}
            rates = {labels.get(n, n): rate for n, rate in self.activity.items()}
            self._draw_in_background(trainer, rates, dict(self.activity), step)

    def _draw_in_background(self, trainer: Any, rates: dict, activity: dict, step: int) -> None:
        """Render and write the heatmap and histograms on a helper thread.

        Drawing them (text, PNG encoding, one event per site) costs ~10-100 ms per window,
        far more than the counting; on a GPU the training thread is mostly waiting for
        the device, so the pictures are drawn meanwhile. One drawing at a time; the
        previous one is finished first, and the last one at the end of training (also on
        errors), before the loggers close. Decisions, scalars and alerts stay on the
        training thread.
        """
        self._finish_drawing()

        def draw() -> None:
            if self.heatmap:
                image = render.activity_heatmap(rates, title=f"firing rate per channel, step {step}")
                self._log_image(trainer, "dead/activity", image, step)
            if self.histograms:
                for n, rate in activity.items():
                    self._log_histogram(trainer, f"dead/rates/{n}", rate, step)

        def run() -> None:
            try:
                draw()
            except BaseException as err:  # reported on the training thread
                self._drawing_error = err

        self._drawing = threading.Thread(target=run, name="DeadNeuronMonitor-draw", daemon=True)
        self._drawing.start()

    def _finish_drawing(self) -> None:
        drawing, self._drawing = getattr(self, "_drawing", None), None
        if drawing is not None:
            drawing.join()
        err, self._drawing_error = getattr(self, "_drawing_error", None), None
        if err is not None:
            rank_zero_warn(f"DeadNeuronMonitor: drawing the activity heatmap failed: {err!r}")

    def _label(self, name: str) -> str:
        return next((s.label for s in self._sites if s.name == name), name)

    def _alert(self, trainer: Any, alerts: list[dict[str, Any]], step: int) -> None:
        lines = [
            f"{a['fraction']:.0%} of the {self.states[a['site']].dead.numel()} channels of site "
            f"'{self._label(a['site'])}' are "
            f"dead (never fired in the last window): channels {_listed(a['channels'])}"
            for a in alerts
        ]
        stop = " Stopping training (stop_on_dead=True)." if self.stop_on_dead else ""
        message = (
            f"DeadNeuronMonitor at step {step}: " + "; ".join(lines) + f" (alert_fraction={self.alert_fraction}). "
            "A learning rate too high or a bad initialisation is the usual cause." + stop
        )
        rank_zero_warn(message, stacklevel=2)
        self._log_text(trainer, "dead/alert", message, step)
        if self.stop_on_dead:
            trainer.should_stop = True  # decided on counts summed over ranks: the same on every rank
            self.stopped_step = step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        counts = {s.name: self._counts[s.key].state() for s in self._sites if s.key in self._counts}
        return {
            **super().state_dict(),
            "window_size": self._window_size,
            "window_batches": self._window_batches,
            "windows_completed": self.windows_completed,
            "counts": counts,
            "flagged": {n: t.clone() for n, t in self._flagged.items()},
            "alerted": sorted(self._alerted),
            "alerts": [dict(a) for a in self.alerts],
            "dead_channels": {n: list(v) for n, v in self.dead_channels.items()},
            "dying_channels": {n: list(v) for n, v in self.dying_channels.items()},
            "saturated_channels": {n: list(v) for n, v in self.saturated_channels.items()},
            "activity": {n: t.clone() for n, t in self.activity.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._window_size = state_dict.get("window_size")
        self._window_batches = state_dict.get("window_batches", 0)
        self.windows_completed = state_dict.get("windows_completed", 0)
        self._flagged = {n: t.clone().bool() for n, t in state_dict.get("flagged", {}).items()}
        self._alerted = set(state_dict.get("alerted", ()))
        self.alerts = [dict(a) for a in state_dict.get("alerts", ())]
        self.dead_channels = {n: list(v) for n, v in state_dict.get("dead_channels", {}).items()}
        self.dying_channels = {n: list(v) for n, v in state_dict.get("dying_channels", {}).items()}
        self.saturated_channels = {n: list(v) for n, v in state_dict.get("saturated_channels", {}).items()}
        self.activity = {n: t.clone() for n, t in state_dict.get("activity", {}).items()}
        self._pending = {"counts": dict(state_dict.get("counts", {}))}
        if self._counts:  # already fitting: apply now
            self._restore(self._pending)
            self._pending = None

    def _restore(self, pending: dict[str, Any]) -> None:
        saved = pending.get("counts", {})
        restored = False
        for site in self._sites:
            state = saved.get(site.name)
            counts = self._counts.get(site.key)
            if state is not None and counts is not None and state["packed"].numel() == counts.pack().numel():
                counts.load_state(state)
                restored = True
        if not restored:  # different sites (changed model or layers): start a fresh window
            self._window_batches = 0
