"""Benchmark: what ``TopActivations`` and ``FeatureMaps`` cost on the demo CNN.

On :class:`lightning_vis.demo.model.DemoModule` (batch 64 of 32×32 images for training,
validation batches of 256 as the demo's loader gives them), medians of repeats:

* one training step (forward, backward, SGD step) — the unit of the budgets;
* ``TopActivations`` collection per validation batch: a validation forward with the
  callback's forward hooks (4 default layers, all channels collected) against the same
  forward without them;
* ``TopActivations`` per run: collection over the demo's whole validation set (512
  images) plus the end-of-run merge and rendering of the 4 grids, in training steps;
* ``FeatureMaps`` per run (4 probe images, 4 layers, rendering included), in training steps;
* memory: the collection's fixed state (top-k lists and patch slots) and, on CUDA, the
  peak memory of a validation forward with collection against without.

The callbacks' hooks are driven directly with a stand-in Trainer (TensorBoard writer to
a temporary directory), so only their own work is timed. Run:
``python benchmarks/units.py [--repeats 7] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from lightning_vis.callbacks import FeatureMaps, TopActivations
from lightning_vis.callbacks._base import _TENSORBOARD_LOGGERS
from lightning_vis.demo import DemoModule, ShapesDataset
from lightning_vis.units import receptive_field

LAYERS = ["net.features.0", "net.features.4", "net.features.8", "net.features.12"]  # the default spread


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _trainer(logdir: str) -> SimpleNamespace:
    logger = _TENSORBOARD_LOGGERS[0](logdir, name="bench")
    return SimpleNamespace(
        sanity_checking=False, current_epoch=0, global_step=1, world_size=1, global_rank=0, is_global_zero=True,
        loggers=[logger], callbacks=[], strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    module = DemoModule().to(device)
    train = ShapesDataset(64, size=32, seed=0)
    val = ShapesDataset(512, size=32, seed=1)
    xb = torch.stack([train[i][0] for i in range(64)]).to(device)
    yb = torch.tensor([train[i][1] for i in range(64)], device=device)
    val_x = torch.stack([val[i][0] for i in range(512)]).to(device)
    val_batches = [val_x[:256], val_x[256:]]
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        module.train()
        loss = torch.nn.functional.cross_entropy(module(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t_step = _median(step, args.repeats, device)

    logdir = tempfile.mkdtemp()
    trainer = _trainer(logdir)
    trainer.strategy.root_device = device

    top = TopActivations()
    top._layer_names = list(LAYERS)
    top._fields = {layer: receptive_field(module, layer, (3, 32, 32)) for layer in LAYERS}
    top._in_channels, top._ready = 3, True
    module.eval()

    def plain_forward() -> None:
        with torch.inference_mode():
            module(val_batches[0])

    def collected_forward() -> None:
        with torch.inference_mode():
            top.on_validation_batch_start(trainer, module, (val_batches[0],), 0)
            module(val_batches[0])
            top.on_validation_batch_end(trainer, module, None, (val_batches[0],), 0)

    def one_run() -> None:
        with torch.inference_mode():
            top._last_step = -1
            top.on_validation_epoch_start(trainer, module)
            for i, batch in enumerate(val_batches):
                top.on_validation_batch_start(trainer, module, (batch,), i)
                module(batch)
                top.on_validation_batch_end(trainer, module, None, (batch,), i)
            top.on_validation_epoch_end(trainer, module)

    one_run()  # warm-up (font loading, TensorBoard writer)
    t_plain = _median(plain_forward, args.repeats, device)
    top._last_step = -1
    top.on_validation_epoch_start(trainer, module)  # hooks on; collectors filled by the repeats
    collected_forward()
    t_collect = _median(collected_forward, args.repeats, device)
    state_bytes = sum(
        t.numel() * t.element_size()
        for c in top._collectors.values()
        for t in (c._values, c._index, c._where, c._slot, c._patches)
        if t is not None
    )
    top._remove_hooks()
    t_top_run = _median(one_run, args.repeats, device)

    peak_note = "n/a (CPU)"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        plain_forward()
        plain_peak = torch.cuda.max_memory_allocated() - base
        top._last_step = -1
        top.on_validation_epoch_start(trainer, module)
        collected_forward()  # first batch: every unit enters the top-k (the most cropping)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        collected_forward()
        collect_peak = torch.cuda.max_memory_allocated() - base
        top._remove_hooks()
        peak_note = f"{collect_peak / 2**20:.1f} MB vs {plain_peak / 2**20:.1f} MB without"

    maps = FeatureMaps()
    maps._probe, maps._layer_names, maps._ready = val_x[:4].cpu(), list(LAYERS), True

    def fm_run() -> None:
        maps._last_step = -1
        maps.on_train_epoch_end(trainer, module)

    fm_run()
    t_fm = _median(fm_run, args.repeats, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Demo CNN (width 32, 32×32 images), {name}, torch {torch.__version__}, median of {args.repeats}\n")
    print("| measurement | time | relative |")
    print("|---|---:|---:|")
    print(f"| training step (batch 64) | {t_step * 1e3:.1f} ms | 1 step |")
    print(f"| validation forward, batch 256 | {t_plain * 1e3:.1f} ms | {t_plain / t_step:.2f} steps |")
    print(f"| same with TopActivations collecting (4 layers) | {t_collect * 1e3:.1f} ms | "
          f"+{(t_collect / t_plain - 1) * 100:.0f}% per validation batch |")  # fmt: skip
    print(f"| TopActivations per run (512 val images + merge + 4 grids) | {t_top_run * 1e3:.1f} ms | "
          f"{t_top_run / t_step:.2f} steps ({(t_top_run - 2 * t_plain) / t_step:.2f} beyond the validation forwards) |")  # fmt: skip
    print(f"| FeatureMaps per run (4 probe images, 4 layers) | {t_fm * 1e3:.1f} ms | {t_fm / t_step:.2f} steps |")
    print(f"| TopActivations collection state (4 layers, top 9, patches ≤ 48 px) | {state_bytes / 2**20:.1f} MB | fixed |")
    print(f"| peak memory of a validation forward with collection | {peak_note} | |")


if __name__ == "__main__":
    main()
