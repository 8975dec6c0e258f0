"""What ``ClassUnitStatistics`` costs on the demo CNN, in one run.

* Per validation batch: the validation forward of the demo CNN (batch 256, as the demo's
  validation loader) with and without the collection (the callback's forward hook on
  the last convolution's ReLU: per-sample channel means, sparsity counts and per-class
  sums on the device). Alternated pairs; the median of the per-pair ratios.
* Per collected epoch: the ablation passes at the defaults (``ablate_batches=2`` batches
  of 256, fractions 0, 0.1, 0.2, 0.3; the batch runs once to the layer, the rest of the
  network on one masked copy per fraction), the same with the batch repeated at the
  input (the fallback for networks with a skip around the layer), and the summaries and
  pictures (similarity, shared/specific units, heatmap, table), against the median
  training step of the demo (batch 64, forward, backward, SGD step). DESIGN's budget:
  a periodic run costs at most 10 training steps.

    python benchmarks/class_units.py                 # prints a Markdown table
    python benchmarks/class_units.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_vis import render
from lightning_vis.class_stats import (
    ClassChannelStats,
    _Capture,
    ablation_accuracy,
    channel_means,
    channel_order,
    class_means,
    class_similarity,
    measurement_layer,
    shared_units,
    sparsity,
    specific_units,
    top_units,
)
from lightning_vis.demo import DemoCNN, make_shapes


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--val-batch", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--ablate-batches", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DemoCNN()
    classes = net.classifier.out_features
    x, y = make_shapes(max(args.val_batch * args.ablate_batches, args.train_batch), seed=0)
    xv, yv = x[: args.val_batch], y[: args.val_batch]
    layer, site = measurement_layer(net, x[:2])
    module = dict(net.named_modules())[site]
    shapes = []
    probe = module.register_forward_hook(lambda m, a, o: shapes.append(o.shape))
    with torch.no_grad():
        net.eval()(x[:2])
    probe.remove()
    channels = shapes[0][1]

    # ---- per validation batch: forward with and without the collection (inference mode, as Lightning validates)
    net.eval()
    stats = ClassChannelStats.empty(classes, channels)
    state = {}
    capture = _Capture(lambda out: state.__setitem__("means", stats.update_channels(out)))

    def plain() -> None:
        with torch.inference_mode():
            net(xv)

    def collected() -> None:
        with torch.inference_mode():
            capture.armed = True
            net(xv)
            stats.add_class_means(state.pop("means"), yv)

    handle = module.register_forward_hook(capture)
    plain(), collected()  # warm-up
    ratios, plain_t, collect_t = [], [], []
    for _ in range(args.repeats):
        a = _time(plain, 1)[0]
        b = _time(collected, 1)[0]
        plain_t.append(a), collect_t.append(b), ratios.append(b / a)
    handle.remove()
    # the hook's own work, timed alone (robust to the noise of whole forwards on a shared machine)
    with torch.inference_mode():
        acts = net.features(xv)
    work = statistics.median(_time(lambda: stats.add_class_means(stats.update_channels(acts), yv), 20 * args.repeats))

    # ---- a training step of the demo
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xt, yt = x[: args.train_batch], y[: args.train_batch]

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(xt), yt).backward()
        opt.step()

    step()
    step_t = statistics.median(_time(step, args.repeats))

    # ---- per collected epoch: ablation passes, summaries and pictures
    batches = [(x[i * args.val_batch : (i + 1) * args.val_batch], y[i * args.val_batch : (i + 1) * args.val_batch])
               for i in range(args.ablate_batches)]  # fmt: skip
    order = channel_order(channel_means(stats).float())
    def ablate(replicate: str) -> float:
        run = lambda: ablation_accuracy(net, batches, site, order, (0.1, 0.2, 0.3), replicate=replicate)
        assert run().at_layer == (replicate == "auto")
        return statistics.median(_time(run, args.repeats))

    ablate_t, ablate_input_t = ablate("auto"), ablate("input")

    def summarise() -> None:
        means = class_means(stats)
        sim = class_similarity(means).float()
        tops = {k: r for k, r in enumerate(top_units(means, 10).tolist())}
        shared, specific = shared_units(means, 10), specific_units(means, 10)
        sparsity(stats)
        render.similarity_heatmap(sim, None, title="bench")
        render.units_markdown(tops, shared, specific)

    summary_t = statistics.median(_time(summarise, args.repeats))

    rows = [
        "| what | median time | relative |",
        "|---|---|---|",
        f"| validation forward, batch {args.val_batch} | {1000 * statistics.median(plain_t):.1f} ms | 1 |",
        f"| the same with the collection (hook on `{site}`, per-class sums) | "
        f"{1000 * statistics.median(collect_t):.1f} ms | {100 * (statistics.median(ratios) - 1):+.1f}% per batch |",
        f"| the hook's work alone (means, sparsity counts, per-class sums) | {1000 * work:.2f} ms | "
        f"{100 * work / statistics.median(plain_t):.2f}% of the forward |",
        f"| training step, batch {args.train_batch} (forward, backward, SGD) | {1000 * step_t:.1f} ms | 1 step |",
        f"| ablation passes: {args.ablate_batches} batches × 4 fractions, shared forward to the layer (default) | "
        f"{1000 * ablate_t:.1f} ms | {ablate_t / step_t:.1f} steps |",
        f"| the same, batch repeated at the input (`replicate=\"input\"`) | "
        f"{1000 * ablate_input_t:.1f} ms | {ablate_input_t / step_t:.1f} steps |",
        f"| summaries, heatmap and table (per collected epoch) | {1000 * summary_t:.1f} ms | "
        f"{summary_t / step_t:.2f} steps |",
        "",
        f"Demo CNN (`{layer}` → `{site}`, {channels} channels, {classes} classes), CPU "
        f"({platform.machine()}), {torch.get_num_threads()} threads, medians of {args.repeats} repeats.",
    ]
    table = "\n".join(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
