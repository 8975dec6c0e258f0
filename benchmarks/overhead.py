"""What the callbacks cost: the demo's training with and without them, in one run.

Each configuration (each callback alone, all together; at their defaults and at their
most frequent settings) is timed against plain training, alternating plain and watched
runs so that drift on a shared machine hits both; the reported number is the median of
the per-pair ratios. A long run with everything at every step samples the resident set
size to show that memory stays flat.

    python benchmarks/overhead.py                 # the README table (about 15 min on 2 cores)
    python benchmarks/overhead.py --repeats 3 --epochs 1 --only DeadNeuronMonitor
    python benchmarks/overhead.py --together both --repeats 2 --train-size 36000 --long-steps 0
                                                  # every callback at its defaults, and suite(), with
                                                  # epochs of >= 1 minute (DESIGN's <= 3% budget)
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from lightning_vis import callbacks as vis
from lightning_vis.demo import DemoModule, ShapesDataset, lightning_package

pl = lightning_package()

# every callback at its most frequent setting
EVERY_STEP = {
    "FilterGrid": dict(every_n_steps=1),
    "DeconvProjection": dict(every_n_steps=1),
    "DeadNeuronMonitor": dict(every_n_steps=1),
    "FeatureEvolution": dict(every_n_epochs=1),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Clock(pl.Callback):
    """Wall time of the fit loop only (setup, data generation excluded), RSS per step."""

    def __init__(self, rss_every: int = 0) -> None:
        self.rss_every = rss_every
        self.rss: list[tuple[int, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rss_every and trainer.global_step % self.rss_every == 0:
            self.rss.append((trainer.global_step, _rss_mb()))


_DATA: dict[int, tuple[ShapesDataset, ShapesDataset]] = {}


def fit(callbacks: list, *, epochs: int, train_size: int, rss_every: int = 0, logdir: str) -> _Clock:
    pl.seed_everything(0, verbose=False)
    model = DemoModule(train_size=train_size)
    if train_size not in _DATA:
        _DATA[train_size] = (ShapesDataset(train_size, seed=0), ShapesDataset(512, seed=1))
    model._train_set, model._val_set = _DATA[train_size]
    clock = _Clock(rss_every)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=pl.loggers.TensorBoardLogger(logdir, name="bench"),
        callbacks=[*callbacks, clock], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=10,
    )  # fmt: skip
    trainer.fit(model)
    return clock


def measure(make_callbacks, *, repeats: int, epochs: int, train_size: int, logdir: str) -> tuple[float, float]:
    """Median ratio watched/plain over alternated pairs, and the median plain time.

    One short untimed watched run first: the one-time costs of a process (imports of
    matplotlib, Pillow's fonts, TensorBoard's writer) belong to no particular run.
    """
    fit(make_callbacks(), epochs=1, train_size=1024, logdir=logdir)
    ratios, plains = [], []
    for i in range(repeats):
        order = [True, False] if i % 2 else [False, True]
        times = {}
        for watched in order:
            cbs = make_callbacks() if watched else []
            times[watched] = fit(cbs, epochs=epochs, train_size=train_size, logdir=logdir).seconds
        ratios.append(times[True] / times[False])
        plains.append(times[False])
    return statistics.median(ratios), statistics.median(plains)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="alternated pairs per configuration (default 5)")
    parser.add_argument("--every-step-repeats", type=int, default=2,
                        help="alternated pairs for the every-step column (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run (default 2)")
    parser.add_argument("--train-size", type=int, default=16384, help="training images per epoch (default 16384, as the demo)")
    parser.add_argument("--long-steps", type=int, default=600, help="steps of the memory run (0: skip)")
    parser.add_argument("--only", nargs="*", default=None, help="callbacks to measure (default: all)")
    parser.add_argument("--logdir", default="benchmarks/out", help="where the runs log (default benchmarks/out)")
    parser.add_argument("--together", choices=("defaults", "suite", "both"), default=None,
                        help="only every callback together: at their defaults, as suite() returns them, or both")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    names = [n for n in vis.__all__ if isinstance(getattr(vis, n), type) and (args.only is None or n in args.only)]

    configs = []
    for name in names:
        cls = getattr(vis, name)
        configs.append((f"{name}", "defaults", lambda cls=cls: [cls()]))
        configs.append((f"{name}", "every step", lambda cls=cls, n=name: [cls(**EVERY_STEP.get(n, {}))]))
    if args.together:
        configs = [("all together", "defaults", lambda: [getattr(vis, n)() for n in names]),
                   ("suite()", "defaults", lambda: vis.suite())]  # fmt: skip
        configs = {"defaults": configs[:1], "suite": configs[1:], "both": configs}[args.together]
    elif len(names) > 1:
        configs.append(("all together", "defaults", lambda: [getattr(vis, n)() for n in names]))
        configs.append(("all together", "every step",
                        lambda: [getattr(vis, n)(**EVERY_STEP.get(n, {})) for n in names]))  # fmt: skip

    print(f"# lightning_vis overhead — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}")  # fmt: skip
    print(f"# demo CNN, {args.train_size} images/epoch, batch 64, {args.epochs} epochs per run, "
          f"median of {args.repeats} alternated pairs ({args.every_step_repeats} for every step)\n", flush=True)  # fmt: skip
    results: dict[tuple[str, str], tuple[float, float]] = {}
    for label, setting, make in configs:
        repeats = args.repeats if setting == "defaults" else args.every_step_repeats
        ratio, plain = measure(make, repeats=repeats, epochs=args.epochs, train_size=args.train_size,
                               logdir=args.logdir)  # fmt: skip
        results[(label, setting)] = (ratio, plain)
        print(f"  {label:20s} {setting:10s} ×{ratio:.3f}  (+{100 * (ratio - 1):.1f}%)  plain {plain:.1f}s",
              file=sys.stderr, flush=True)  # fmt: skip

    print("| callback | at defaults | at every step |")
    print("|---|---|---|")
    for label in dict.fromkeys(label for label, _ in results):
        cells = []
        for setting in ("defaults", "every step"):
            ratio, _ = results.get((label, setting), (None, None))
            cells.append("—" if ratio is None else f"{100 * (ratio - 1):+.1f}%")
        print(f"| {label} | {cells[0]} | {cells[1]} |")

    if args.long_steps:
        steps_per_epoch = args.train_size // 64
        epochs = max(1, -(-args.long_steps // steps_per_epoch))
        every = max(1, args.long_steps // 20)
        print(f"\nResident memory over {epochs * steps_per_epoch} steps (MB, after warm-up at 25% → end):")
        for label, cbs in (("plain training", []),
                           ("all at every step", [getattr(vis, n)(**EVERY_STEP.get(n, {})) for n in names])):
            rss = fit(cbs, epochs=epochs, train_size=args.train_size, rss_every=every, logdir=args.logdir).rss
            warm = rss[len(rss) // 4]
            print(f"  {label:24s} {warm[1]:.0f} MB at step {warm[0]} → {rss[-1][1]:.0f} MB at step {rss[-1][0]} "
                  f"({rss[-1][1] - warm[1]:+.1f} MB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
