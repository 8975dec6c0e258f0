"""What each callback costs on a GPU, trained the way users train (DESIGN "Performance budgets").

torchvision resnet18 (batch 256) and resnet50 (batch 128) without pretrained weights, 224-px
synthetic images from a pinned in-memory pool (so the data loader hides nothing),
``precision="bf16-mixed"``, ``channels_last``, a Lightning ``Trainer`` with no validation.
For each callback at its defaults (the four core ones, then any other callback class
exported by ``lightning_vis.callbacks`` that builds without arguments), and for all
together: plain and watched runs alternate; each run's ms/step is timed from step
``--warmup`` to the end (one ``torch.cuda.synchronize`` at each end, none in between);
the table gives medians over ``--repeats`` pairs, the median ratio, the peak memory of
the run (``torch.cuda.max_memory_allocated``), and each periodic run's cost (its
method timed between two synchronizations): the first run (with one-time costs such
as cuDNN autotuning for the probe's shapes) apart from the median of the later ones,
also in units of the plain step (budget: 10 steps).

    PYTHONPATH=/path/to/repo python benchmarks/gpu.py                # full run (~20 min on an H100)
    PYTHONPATH=/path/to/repo python benchmarks/gpu.py --models resnet18 --repeats 2
    python benchmarks/gpu.py --smoke                                  # tiny CPU check (seconds)

No internet needed: models are built with ``weights=None``, data is generated.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

CORE = ["DeadNeuronMonitor", "FilterGrid", "DeconvProjection", "FeatureEvolution"]
# the method that does each callback's periodic work (timed per run)
RUN_METHODS = {
    "DeadNeuronMonitor": "_end_window",
    "FilterGrid": "_log",
    "DeconvProjection": "_run",
    "FeatureEvolution": "_snapshot",
}


def _pl():
    from lightning_vis.demo import lightning_package

    return lightning_package()


class PinnedPool(Dataset):
    """``batches`` pre-made batches in pinned host memory, served round-robin (``batch_size=None``)."""

    def __init__(self, batches: int, batch: int, size: int, classes: int, steps: int, pin: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = [torch.randn(batch, 3, size, size, generator=g) for _ in range(batches)]
        self.y = [torch.randint(0, classes, (batch,), generator=g) for _ in range(batches)]
        if pin:
            self.x = [t.pin_memory() for t in self.x]
            self.y = [t.pin_memory() for t in self.y]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        return self.x[i % len(self.x)], self.y[i % len(self.y)]


def make_module(arch: str, pool: PinnedPool, classes: int, channels_last: bool):
    import torchvision

    pl = _pl()

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if arch == "tiny":
                from lightning_vis.demo.model import DemoCNN

                self.net = DemoCNN(num_classes=classes, width=16)
            else:
                self.net = getattr(torchvision.models, arch)(weights=None, num_classes=classes)
            if channels_last:
                self.net = self.net.to(memory_format=torch.channels_last)

        def forward(self, x):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def train_dataloader(self):
            return DataLoader(pool, batch_size=None, shuffle=False, num_workers=0)

    return Net()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock(warmup: int):
    pl = _pl()

    class Clock(pl.Callback):
        """ms/step from step ``warmup`` to the end of training."""

        def __init__(self) -> None:
            self.start = None
            self.steps = 0
            self.ms_per_step = float("nan")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and self.start is None:
                _sync()
                self.start = time.perf_counter()
                self.first = trainer.global_step

        def on_train_end(self, trainer, pl_module):
            _sync()
            if self.start is not None:
                self.ms_per_step = 1e3 * (time.perf_counter() - self.start) / max(1, trainer.global_step - self.first)

    return Clock()


def _timed(callback: Any, method: str, into: list[float]) -> None:
    fn = getattr(callback, method)

    def wrapped(*args, **kwargs):
        _sync()
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync()
            into.append(1e3 * (time.perf_counter() - t))

    setattr(callback, method, wrapped)


def fit(arch: str, pool: PinnedPool, args, make_callbacks) -> dict:
    pl = _pl()
    pl.seed_everything(0, verbose=False)
    module = make_module(arch, pool, args.classes, not args.no_channels_last)
    callbacks = make_callbacks()
    runs: dict[str, list[float]] = {}
    for cb in callbacks:
        method = RUN_METHODS.get(type(cb).__name__)
        if method and hasattr(cb, method):
            _timed(cb, method, runs.setdefault(type(cb).__name__, []))
    clock = _clock(args.warmup)
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, precision=args.precision, max_epochs=args.epochs,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[*callbacks, clock],
            logger=pl.loggers.TensorBoardLogger(logdir, name="gpu"), enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50,
        )  # fmt: skip
        trainer.fit(module)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del module, trainer
    return {"ms": clock.ms_per_step, "peak": peak, "runs": runs}


def callback_configs(names: list[str] | None, together: bool = True) -> list[tuple[str, Any]]:
    from lightning_vis import callbacks as vis

    pl = _pl()
    available = []
    for name in getattr(vis, "__all__", []):
        cls = getattr(vis, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, pl.Callback)):
            continue
        try:
            cls()
        except Exception:  # needs arguments: not measurable at defaults
            continue
        available.append(name)
    order = [n for n in CORE if n in available] + [n for n in available if n not in CORE]
    if names:
        order = [n for n in order if n in names]
    configs = [(n, lambda n=n: [getattr(vis, n)()]) for n in order]
    if len(order) > 1 and together:
        configs.append(("all together", lambda: [getattr(vis, n)() for n in order]))
    return configs


def measure(arch: str, batch: int, args) -> list[dict]:
    size = args.size
    pin = torch.cuda.is_available() and not args.smoke
    pool = PinnedPool(args.pool, batch, size, args.classes, args.steps, pin=pin)
    rows = []
    for label, make in callback_configs(args.callbacks, together=not args.smoke):
        try:
            rows.append(measure_one(arch, batch, args, pool, label, make))
        except Exception as err:  # one callback failing must not lose the others' numbers
            print(f"  {arch} b{batch} {label}: failed: {err!r}", file=sys.stderr, flush=True)
            rows.append({"model": f"{arch} b{batch}", "callback": label, "error": f"{type(err).__name__}: {err}"})
    return rows


def measure_one(arch: str, batch: int, args, pool: PinnedPool, label: str, make) -> dict:
    if True:
        plain, watched, ratios, peaks_plain, peaks_with, runs = [], [], [], [], [], {}
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            result = {}
            for with_cb in order:
                result[with_cb] = fit(arch, pool, args, make if with_cb else list)
            plain.append(result[False]["ms"])
            watched.append(result[True]["ms"])
            ratios.append(result[True]["ms"] / result[False]["ms"])
            peaks_plain.append(result[False]["peak"])
            peaks_with.append(result[True]["peak"])
            for name, times in result[True]["runs"].items():
                runs.setdefault(name, []).append(times)
            print(f"  {arch} b{batch} {label}: plain {plain[-1]:.1f} ms, with {watched[-1]:.1f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
        step = statistics.median(plain)
        run_cells = []
        for name, per_fit in runs.items():
            firsts = [t[0] for t in per_fit if t]
            later = [x for t in per_fit for x in t[1:]]
            if not firsts:
                continue
            first = statistics.median(firsts)
            typical = statistics.median(later) if later else first
            run_cells.append(f"{name}: {typical:.0f} ms = {typical / step:.1f} steps (first {first:.0f} ms, "
                             f"one-time {max(0.0, first - typical):.0f} ms)")  # fmt: skip
        return {
            "model": f"{arch} b{batch}", "callback": label, "plain": step, "with": statistics.median(watched),
            "ratio": statistics.median(ratios), "peak_plain": max(peaks_plain), "peak_with": max(peaks_with),
            "runs": "; ".join(run_cells) or "–",
        }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print("| model | callback | plain ms/step | with ms/step | ratio | peak memory plain → with | per-run cost |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['callback']} | – | – | – | – | failed: {r['error'][:200]} |")
            continue
        peak = f"{r['peak_plain']:.2f} → {r['peak_with']:.2f} GB"
        if r["peak_plain"] != r["peak_plain"]:  # NaN: no CUDA
            peak = "n/a (CPU)"
        print(f"| {r['model']} | {r['callback']} | {r['plain']:.1f} | {r['with']:.1f} | ×{r['ratio']:.3f} | {peak} "
              f"| {r['runs']} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50"], help="resnet18 and/or resnet50")
    parser.add_argument("--callbacks", nargs="*", default=None, help="class names (default: all that build)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated plain/with pairs (default 3)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch (default 100)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing starts (default 20)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=4, help="pinned batches in the pool (default 4)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script works")
    args = parser.parse_args(argv)
    batches = {"resnet18": 256, "resnet50": 128}
    if args.smoke:
        args.models, args.repeats, args.epochs, args.steps, args.warmup = ["tiny"], 1, 2, 4, 1
        args.size, args.classes, args.pool = 16, 4, 2
        batches = {"tiny": 8}
        if args.callbacks is None:
            args.callbacks = CORE
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if torch.cuda.is_available() and not args.smoke:
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores) — smoke settings, not a GPU measurement"
    print(f"# lightning_vis on {device}")
    print(f"# torch {torch.__version__}, {args.precision}, channels_last={not args.no_channels_last}, "
          f"{args.size} px, {args.epochs} epochs × {args.steps} steps timed from step {args.warmup}, "
          f"median of {args.repeats} alternated pairs\n")  # fmt: skip
    rows = []
    for arch in args.models:
        rows.extend(measure(arch, batches.get(arch, 64), args))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
