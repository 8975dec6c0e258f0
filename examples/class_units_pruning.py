"""Shang et al.'s pruning claim on our own run: the least active channels hardly matter.

Shang et al. rank the channels of a network's last convolution by their mean
activation and zero a fraction of them: removing the *least* active ones changes the
accuracy by at most a point or two, removing the *most* active ones costs far more. This
script checks the claim on the demo CNN (``lightning_vis.demo``: four conv blocks, 128
channels in the last convolution, trained on the generated shapes and stripes):

1. train the demo with :class:`~lightning_vis.callbacks.ClassUnitStatistics` attached
   (so the run's TensorBoard shows ``class_units/*``: class similarity, shared and
   class-specific units, sparsity, accuracy with the least active channels zeroed);
2. rank the channels of the last convolution's rectified output by mean activation on
   training images (:func:`~lightning_vis.class_stats.collect_class_stats`), so the
   ranking is not chosen on the images it is evaluated on;
3. evaluate the whole validation set with 10/20/30% of the channels zeroed: the least
   active, the most active and, as a reference, random ones (mean of 5 draws)
   (:func:`~lightning_vis.class_stats.ablation_accuracy`), and print a Markdown table.

Run::

    python examples/class_units_pruning.py                  # the README table's BatchNorm rows
    python examples/class_units_pruning.py --no-batchnorm   # its rows without BatchNorm
    python examples/class_units_pruning.py --epochs 8 --train-size 16384 --logdir runs

(14-25 min each at the defaults on 2 CPU cores shared with other jobs, OMP_NUM_THREADS=2.)
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.utils.data import DataLoader, Subset

from lightning_vis.callbacks import ClassUnitStatistics
from lightning_vis.class_stats import (
    ablation_accuracy,
    channel_means,
    channel_order,
    class_means,
    class_similarity,
    collect_class_stats,
    mean_off_diagonal,
    shared_units,
    sparsity,
    specific_units,
    zeroed_count,
)
from lightning_vis.demo import DemoModule
from lightning_vis.demo.model import lightning_package

pl = lightning_package()

FRACTIONS = (0.1, 0.2, 0.3)


def _row(label: str, values: list[float], base: float) -> str:
    cells = [f"{100 * v:.1f}% ({100 * (v - base):+.1f})" for v in values]
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--rank-size", type=int, default=2048, help="training images used to rank the channels")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default=None, help="TensorBoard directory (default: no logger)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--no-batchnorm", action="store_true", help="the demo CNN without BatchNorm (conv → ReLU → pool)")
    parser.add_argument("--save", default=None, help="save the trained weights here (torch.save of the state_dict)")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = DemoModule(train_size=args.train_size, val_size=args.val_size, seed=args.seed,
                       batchnorm=not args.no_batchnorm)  # fmt: skip
    monitor = ClassUnitStatistics(top_n=10, ablate=FRACTIONS)
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="class_units") if args.logdir else False
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=logger, callbacks=[monitor],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=20,
    )  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*no logger.*")
        trainer.fit(model)
    trained = time.perf_counter() - start
    if args.save:
        torch.save(model.state_dict(), args.save)
    layer, site = monitor.layer_name, monitor.site
    classes = len(model._val_set.classes) if hasattr(model._val_set, "classes") else int(monitor.class_means.shape[0])
    print(f"Trained {args.epochs} epochs on {args.train_size} images in {trained:.0f} s; the callback watched {site!r} "
          f"(the rectified output of {layer!r}); after the last epoch: accuracy@p {monitor.accuracy}")  # fmt: skip

    # rank the channels on training images, evaluate on the validation set
    model.eval()
    rank_loader = DataLoader(Subset(model._train_set, range(min(args.rank_size, len(model._train_set)))), batch_size=256)
    val_loader = DataLoader(model._val_set, batch_size=256)
    stats = collect_class_stats(model, rank_loader, site, classes)
    means = channel_means(stats).float().cpu()
    channels = means.numel()
    least = channel_order(means)
    most = channel_order(means, most_active_first=True)
    acc_least = ablation_accuracy(model, val_loader, site, least, FRACTIONS).accuracy
    acc_most = ablation_accuracy(model, val_loader, site, most, FRACTIONS).accuracy
    g = torch.Generator().manual_seed(args.seed)
    randoms = [
        ablation_accuracy(model, val_loader, site, torch.randperm(channels, generator=g), FRACTIONS).accuracy
        for _ in range(args.random_draws)
    ]
    acc_random = {p: sum(r[p] for r in randoms) / len(randoms) for p in acc_least}
    base = acc_least[0.0]

    val_stats = collect_class_stats(model, val_loader, site, classes)
    cm = class_means(val_stats)
    sim = class_similarity(cm)
    shared = shared_units(cm, 10)
    specific = specific_units(cm, 10)
    dead = int((means <= 0).sum())

    header = " | ".join(f"{int(100 * p)}% ({zeroed_count(p, channels)} ch.)" for p in FRACTIONS)
    lines = [
        f"Demo CNN{' without BatchNorm' * args.no_batchnorm}, {args.epochs} epochs on {args.train_size} generated images; `{layer}` ({channels} channels, measured "
        f"at `{site}`), channels ranked by mean activation on {min(args.rank_size, args.train_size)} training images, "
        f"accuracy on {args.val_size} validation images (unablated: {100 * base:.1f}%).",
        "",
        f"| channels zeroed | {header} |",
        "|---|" + "---|" * len(FRACTIONS),
        _row("least active", [acc_least[p] for p in FRACTIONS], base),
        _row(f"random (mean of {args.random_draws})", [acc_random[p] for p in FRACTIONS], base),
        _row("most active", [acc_most[p] for p in FRACTIONS], base),
        "",
        f"Channels with mean activation 0 (never fire on the ranking images): {dead} of {channels}. "
        f"Mean sparsity (outputs = 0): {float(sparsity(val_stats).mean()):.2f}. "
        f"Class similarity, mean off-diagonal: {mean_off_diagonal(sim):.3f}. "
        f"Top-10 units: {len(shared)} shared by all {classes} classes, "
        f"{sum(len(v) for v in specific.values())} class-specific.",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    return table


if __name__ == "__main__":
    main()
