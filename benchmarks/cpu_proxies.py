"""CPU proxies of the GPU budgets (DESIGN "Performance budgets"), measurable on 2 cores.

Three tables, each printed as Markdown:

1. ``DeadNeuronMonitor`` per counted step, on the demo CNN (batch 64, 32 px) and on
   torchvision resnet18 (batch 32, 32 px): the plain training step; the counted step's
   extra time (median of alternated pairs); what the counting itself costs according to
   ``torch.profiler`` (CPU time inside the counting functions, aten ops dispatched per
   counted site: each is one kernel launch on a GPU); the function mode and module
   hooks alone (a pass-through handler); the window end (sum over ranks, decisions,
   scalars, heatmap, histograms: all of it in CPU time, and in brackets the part left on
   the training thread, the pictures being drawn on a helper thread); and the amortised
   cost at the defaults, counting all the window end's CPU time:
   ``(counted extra / every_n_steps + window end / (window × every_n_steps)) / plain step``.
2. Probe-pass peak memory against a training step's, from the CPU allocator's own
   records (``torch.profiler`` with ``profile_memory=True``, coalesced into a memory
   timeline by ``torch.profiler._memory_profiler.MemoryProfileTimeline``): every byte
   allocated and freed during the pass, so the peak is the largest sum of live
   allocations made inside it, on top of what was resident before (weights, gradients,
   optimizer state). The probe pass runs after the step, from the same resident state,
   so it adds ``max(0, probe peak − step peak)`` to the training peak; the budget is
   ``max(10% of the training peak, 256 MB)``.
3. Per-run cost of each periodic callback run in a real ``Trainer`` on the demo, at the
   defaults: the first run (one-time costs: warm-up, default-layer discovery) apart, the
   median of the later runs in units of the median plain training step.

    python benchmarks/cpu_proxies.py                  # everything (~5 min on 2 busy cores)
    python benchmarks/cpu_proxies.py --only monitor   # one table: monitor | memory | runs

Timings are CPU time of this process by default (``--clock cpu``): on a shared machine,
wall time mostly measures the other processes. Run it with ``OMP_NUM_THREADS=1``.
The numbers are proxies: on a
GPU the forward runs asynchronously, so the monitor's Python work only costs where the
host is the bottleneck, while each aten op is a kernel launch (~5 µs of host time, a
few µs of GPU time); ``benchmarks/gpu.py`` measures the real thing.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from lightning_vis import stats
from lightning_vis.callbacks import dead as dead_module
from lightning_vis.callbacks import DeadNeuronMonitor
from lightning_vis.demo.model import DemoCNN
from lightning_vis.sites import find_activation_sites, intercept_activations


# --------------------------------------------------------------------------- models
def demo_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return DemoCNN(), torch.randn(64, 3, 32, 32), torch.randint(0, 4, (64,))


def resnet18_setup(batch: int = 32, size: int = 32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))


MODELS = {"demo CNN b64 32px": demo_setup, "resnet18 b32 32px": resnet18_setup}


#: what the timings read: CPU time of this process by default (on a shared machine wall
#: time mostly measures the other processes; with OMP_NUM_THREADS=1 CPU time is the work done)
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def _median_pairs(fa, fb, repeats: int) -> tuple[float, float, float]:
    """Median of a and b times and of the paired differences b - a (alternated order)."""
    ta, tb, diff = [], [], []
    for i in range(repeats):
        times = {}
        for which in ((0, 1) if i % 2 else (1, 0)):
            t = clock()
            (fa if which == 0 else fb)()
            times[which] = clock() - t
        ta.append(times[0])
        tb.append(times[1])
        diff.append(times[1] - times[0])
    return statistics.median(ta), statistics.median(tb), statistics.median(diff)


# --------------------------------------------------------------------------- 1. monitor
def _fake_trainer(logdir: str, step: int = 0):
    from lightning.pytorch.loggers import TensorBoardLogger

    return SimpleNamespace(
        strategy=SimpleNamespace(reduce=lambda t, reduce_op=None: t),
        global_step=step, is_global_zero=True, loggers=[TensorBoardLogger(logdir, name="proxy")],
        world_size=1, should_stop=False, sanity_checking=False,
    )  # fmt: skip


def _count_wrappers():
    """Wrap the counting entry points (old: update_activity; new: ActivityAccumulator) in profiler ranges."""
    from torch.profiler import record_function

    patched = []

    def wrap(owner, name):
        fn = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with record_function("lv::count"):
                return fn(*args, **kwargs)

        setattr(owner, name, wrapped)
        patched.append((owner, name, fn))

    if hasattr(stats, "ActivityAccumulator"):
        wrap(stats.ActivityAccumulator, "add")
        wrap(stats.ActivityAccumulator, "flush")
    else:  # the code before issue #10
        wrap(dead_module, "update_activity")
    return patched


def monitor_proxy(name: str, setup, repeats: int) -> dict:
    model, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = DeadNeuronMonitor()
    mon._root = model
    mon._init_sites(None, find_activation_sites(model, x[:2]))
    sites = len(mon._counts)

    def step(counted: bool, handler=None) -> None:
        opt.zero_grad()
        if counted:
            mon._ctx = intercept_activations(model, handler or mon._handle)
            mon._ctx.__enter__()
            try:
                out = model(x)
            finally:
                mon._exit()  # what on_before_backward does
        else:
            out = model(x)
        F.cross_entropy(out, y).backward()
        opt.step()

    for _ in range(2):
        step(False)
        step(True)
    plain, counted, extra = _median_pairs(lambda: step(False), lambda: step(True), repeats)
    _, _, mode_only = _median_pairs(lambda: step(False), lambda: step(True, lambda call: call.run()), repeats)

    # profiler: the counting's own CPU time and the aten ops it dispatches
    from torch.profiler import ProfilerActivity, profile

    patched = _count_wrappers()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(True)
    finally:
        for owner, attr, fn in patched:
            setattr(owner, attr, fn)
    events = prof.events()
    ranges = [e for e in events if e.name == "lv::count"]
    count_us = sum(e.cpu_time_total for e in ranges)
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is not None
              and e.cpu_parent.name == "lv::count")  # fmt: skip

    # the window end, with every logger output (heatmap, histograms) as in training
    window = math.ceil(dead_module.WINDOW_IMAGES / x.shape[0])
    with tempfile.TemporaryDirectory() as logdir:
        trainer = _fake_trainer(logdir, step=5 * window)
        mon._end_window(trainer)  # first: TensorBoard writer creation etc.
        finish = getattr(mon, "_finish_drawing", lambda: None)  # pictures drawn on a helper thread (new code)
        finish()
        ends, mains = [], []
        for _ in range(max(3, repeats // 2)):
            step(True)
            t, t_main = clock(), time.thread_time()
            mon._end_window(trainer)
            mains.append(time.thread_time() - t_main)
            finish()
            ends.append(clock() - t)
        trainer.loggers[0].experiment.close()
    end = statistics.median(ends)
    end_main = statistics.median(mains)
    every = mon.every_n_steps
    amortised = (extra / every + end / (window * every)) / plain
    return dict(model=name, sites=sites, plain=plain, counted=counted, extra=extra, mode_only=mode_only,
                count_ms=count_us / 1e3, ops_per_site=ops / max(sites, 1), end=end, end_main=end_main, every=every,
                window=window, amortised=amortised)  # fmt: skip


def print_monitor(rows: list[dict]) -> None:
    print("| model | sites | plain step | counted step: extra | counting (profiler) | aten ops / site "
          "| mode + hooks alone | window end: all (training thread) | every_n_steps × window | amortised |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['sites']} | {1e3 * r['plain']:.1f} ms | {1e3 * r['extra']:+.2f} ms "
              f"({100 * r['extra'] / r['plain']:+.1f}%) | {r['count_ms']:.2f} ms | {r['ops_per_site']:.1f} "
              f"| {1e3 * r['mode_only']:+.2f} ms | {1e3 * r['end']:.1f} ms ({1e3 * r['end_main']:.1f} ms) "
              f"| {r['every']} × {r['window']} "
              f"| **{100 * r['amortised']:.2f}%** |")  # fmt: skip


def micro_proxy(name: str, setup, repeats: int) -> dict:
    """The monitor's two costs in isolation, minimum over ``repeats`` (robust on a busy machine).

    counting: every site's output of one real forward (captured once) counted as the
    monitor counts it; interception: one training-mode forward with the function mode and
    the module hooks (pass-through handler) minus a plain one; enter/exit: installing and
    removing them.
    """
    model, x, _ = setup()
    mon = DeadNeuronMonitor()
    mon._root = model
    mon._init_sites(None, find_activation_sites(model, x[:2]))
    outputs = []

    def capture(call):
        out = call.run()
        if call.key in mon._counts:
            outputs.append((mon._counts[call.key], out.detach().clone()))
        return out

    with torch.no_grad(), intercept_activations(model, capture):
        model(x)

    if hasattr(stats, "ActivityAccumulator"):
        def count() -> None:
            acc = stats.ActivityAccumulator()
            for counts, out in outputs:
                acc.add(counts, out)
            acc.flush()
    else:  # the code before issue #10
        def count() -> None:
            for counts, out in outputs:
                stats.update_activity(counts, out)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = clock()
            fn()
            times.append(clock() - t)
        return min(times)

    def enter_exit() -> None:
        with intercept_activations(model):
            pass

    def forward(intercepted: bool):
        def run() -> None:
            if intercepted:
                with intercept_activations(model):
                    model(x)
            else:
                model(x)
        return run

    plain = best(forward(False))
    return dict(model=name, sites=len(outputs), count=best(count), enter_exit=best(enter_exit), plain_fwd=plain,
                intercept=best(forward(True)) - plain)  # fmt: skip


def print_micro(rows: list[dict]) -> None:
    print("| model | sites | counting one forward's sites | interception: enter + exit | interception: in the "
          "forward | plain forward |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['sites']} | {1e3 * r['count']:.2f} ms | {1e3 * r['enter_exit']:.2f} ms "
              f"| {1e3 * r['intercept']:+.2f} ms | {1e3 * r['plain_fwd']:.1f} ms |")


# --------------------------------------------------------------------------- 2. memory
def peak_bytes(fn) -> int:
    """Peak of the bytes allocated (and not yet freed) while ``fn`` runs, from the CPU allocator's records."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max((sum(s) for s in sizes), default=0)


def memory_proxy(name: str, setup) -> list[tuple]:
    from lightning_vis import project
    from lightning_vis.callbacks.evolution import probe_layers
    from lightning_vis.layers import conv_layers

    model, x, y = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    train_step()  # gradients and momentum buffers exist: the resident state of training
    resident = sum(t.numel() * t.element_size() for t in
                   [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(),
                    *(s["momentum_buffer"] for s in opt.state.values())])  # fmt: skip
    step_peak = peak_bytes(train_step)
    train_peak = resident + step_peak
    budget = max(0.1 * train_peak, 256 * 2**20)
    convs = list(conv_layers(model))
    layers = [convs[round(i * (len(convs) - 1) / 3)] for i in range(4)]
    probe = torch.randn(64, *x.shape[1:])

    def snapshot() -> None:  # FeatureEvolution's probe computation at its defaults (64 images, top 4)
        stats_ = probe_layers(model, probe, layers)
        for layer in layers:
            _, peaks = stats_[layer]
            channels = torch.sort(peaks.mean(0), descending=True, stable=True).indices[:4]
            best = peaks[:, channels].argmax(0)
            project(model, probe[best], layer, channels=channels[:, None])

    def panel() -> None:  # DeconvProjection's run at its defaults (4 images, top 9)
        for layer in layers:
            project(model, probe[:4], layer, top_k=9)

    rows = []
    for what, fn in (("FeatureEvolution snapshot (64 probe images)", snapshot),
                     ("DeconvProjection panel (4 images × top 9)", panel)):  # fmt: skip
        probe_peak = peak_bytes(fn)
        added = max(0, probe_peak - step_peak)
        rows.append((name, what, train_peak, probe_peak, added, budget))
    return rows


def print_memory(rows: list[tuple]) -> None:
    mb = 2**20
    print("| model | probe pass | training peak | probe-pass peak (above resident) | added to the training peak "
          "| budget |")
    print("|---|---|---:|---:|---:|---:|")
    for name, what, train_peak, probe_peak, added, budget in rows:
        print(f"| {name} | {what} | {train_peak / mb:.1f} MB | {probe_peak / mb:.1f} MB | {added / mb:.1f} MB "
              f"({100 * added / train_peak:.1f}%) | {budget / mb:.0f} MB |")


# --------------------------------------------------------------------------- 3. per-run costs
def runs_proxy(epochs: int, train_size: int) -> list[tuple]:
    from lightning_vis import callbacks as vis
    from lightning_vis.demo import DemoModule, ShapesDataset, lightning_package

    pl = lightning_package()
    data = (ShapesDataset(train_size, seed=0), ShapesDataset(256, seed=1))
    timers: dict[str, list[float]] = {}

    class StepClock(pl.Callback):
        def __init__(self):
            self.times, self.last = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.last = clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(clock() - self.last)

    def timed(obj, method: str, label: str) -> None:
        fn = getattr(obj, method)

        def wrapped(*args, **kwargs):
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.setdefault(label, []).append(clock() - t)

        setattr(obj, method, wrapped)

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        model = DemoModule(train_size=train_size)
        model._train_set, model._val_set = data
        clock = StepClock()
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[*callbacks, clock],
                                 logger=pl.loggers.TensorBoardLogger(logdir, name="runs"),
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                 num_sanity_val_steps=0, log_every_n_steps=50)  # fmt: skip
            trainer.fit(model)
        return clock

    plain = statistics.median(fit([]).times[5:])
    grid, deconv, evo = vis.FilterGrid(every_n_steps=20), vis.DeconvProjection(), vis.FeatureEvolution()
    monitor = vis.DeadNeuronMonitor(window=4)  # a window end every 20 steps; its cost does not depend on window
    timed(grid, "_log", "FilterGrid run")
    timed(deconv, "_run", "DeconvProjection panel")
    timed(evo, "_snapshot", "FeatureEvolution snapshot")
    timed(monitor, "_end_window", "DeadNeuronMonitor window end")
    fit([grid, deconv, evo, monitor])
    rows = []
    for label, times in timers.items():
        later = times[1:] or times
        rows.append((label, len(times), times[0], statistics.median(later), plain))
    return rows


def print_runs(rows: list[tuple]) -> None:
    print("| periodic run | runs | first run (one-time costs included) | later runs (median) "
          "| in plain training steps (budget ≤ 10) |")
    print("|---|---:|---:|---:|---:|")
    for label, n, first, later, plain in rows:
        print(f"| {label} | {n} | {1e3 * first:.0f} ms | {1e3 * later:.0f} ms | {later / plain:.1f} |")
    if rows:
        print(f"\nplain training step (median): {1e3 * rows[0][4]:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["monitor", "micro", "memory", "runs"], nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=15, help="alternated pairs per timing (default 15)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the per-run Trainer (default 3)")
    parser.add_argument("--train-size", type=int, default=1024, help="demo images per epoch there (default 1024)")
    parser.add_argument("--clock", choices=list(CLOCK), default="cpu",
                        help="cpu: CPU time of this process (default; robust on a shared machine), wall: wall time")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCK[args.clock]
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    only = set(args.only or ["monitor", "micro", "memory", "runs"])
    print(f"# lightning_vis CPU proxies — {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} time, lightning_vis from "
          f"{os.path.dirname(stats.__file__)}\n")  # fmt: skip
    if "monitor" in only:
        print("## DeadNeuronMonitor at its defaults, per counted step\n")
        print_monitor([monitor_proxy(n, s, args.repeats) for n, s in MODELS.items()])
        print()
    if "micro" in only:
        print(f"## DeadNeuronMonitor's parts in isolation (minimum of {3 * args.repeats} repeats)\n")
        print_micro([micro_proxy(n, s, 3 * args.repeats) for n, s in MODELS.items()])
        print()
    if "memory" in only:
        print("## Probe-pass peak memory (CPU allocator) against a training step\n")
        print_memory([row for n, s in MODELS.items() for row in memory_proxy(n, s)])
        print()
    if "runs" in only:
        print("## Per-run cost of the periodic callbacks (demo, Trainer, defaults)\n")
        print_runs(runs_proxy(args.epochs, args.train_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
