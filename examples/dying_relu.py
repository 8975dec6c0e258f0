"""Dying ReLUs caught early: the demo CNN without BatchNorm at a learning rate that kills channels.

The demo CNN (conv → ReLU → pool, no BatchNorm) is trained with SGD, momentum 0.9, at
``--lr 0.25`` on the generated 32-px shapes and stripes (10 classes). The first large updates push
many channels' biases and weights where their ReLU never opens again: they are dead,
and no gradient brings them back. ``DeadNeuronMonitor`` counts every channel's
activity on the training batches themselves and raises its alert (a warning, and the
text ``dead/alert`` in TensorBoard) at the end of the first window in which a site
loses more than a quarter of its channels, while the loss is still falling and looks
like an ordinary run. The script prints, after each window, the step, the recent loss
and each site's dead fraction; then the alert's step and the loss then and later.

Run::

    python examples/dying_relu.py --logdir runs
    python examples/dying_relu.py --logdir runs --lr 0.1    # the same net: 5% dead, healthy
    tensorboard --logdir runs      # dead/total, dead/<site>, dead/activity, dead/alert, and
                                   # filters/net.features.3 with the dead filters framed in red

Measured on the 10-class demo data: at ``--lr 0.25`` the alert comes at step 96, with 30% of
``net.features.4`` dead and the loss still at chance (2.305); at 0.2 two sites reach 20-23%
dead without an alert; at 0.1 at most 5%. (If the net diverges to NaN, the monitor warns
that the activations are not finite rather than calling them dead.)
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from lightning_vis.callbacks import DeadNeuronMonitor, FilterGrid
from lightning_vis.demo import DemoModule
from lightning_vis.demo.model import lightning_package

pl = lightning_package()


class LossTrace(pl.Callback):
    """The training loss of every step (kept on the host: a float per step, for this script only)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class WindowTable(pl.Callback):
    """After each of the monitor's windows: the step, the recent loss and each site's dead fraction."""

    def __init__(self, monitor: DeadNeuronMonitor, trace: LossTrace) -> None:
        self.monitor, self.trace = monitor, trace
        self.rows: list[tuple[int, float, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor.windows_completed > len(self.rows):
            dead = {s: len(d) / self.monitor.activity[s].numel() for s, d in self.monitor.dead_channels.items()}
            recent = self.trace.losses[-10:]
            self.rows.append((trainer.global_step, statistics.median(recent), dead))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lr", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=1)
    parser.add_argument("--window", type=int, default=None, help="sampled batches per window (default: ~2048 images)")
    parser.add_argument("--alert-fraction", type=float, default=0.25)
    parser.add_argument("--logdir", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = DemoModule(batchnorm=False, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                       train_size=args.train_size, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    monitor = DeadNeuronMonitor(every_n_steps=args.every_n_steps, window=args.window,
                                alert_fraction=args.alert_fraction)  # fmt: skip
    trace = LossTrace()
    table = WindowTable(monitor, trace)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", deterministic=True, callbacks=[monitor, FilterGrid(layer="net.features.3", every_n_steps=32), trace, table],
        logger=pl.loggers.TensorBoardLogger(args.logdir, name="dying_relu"), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)

    losses = trace.losses
    window_steps = (monitor._window_size or 0) * args.every_n_steps

    def loss_near(step: int) -> float:  # median over the 10 steps up to ``step``
        return statistics.median(losses[max(0, step - 10) : max(1, step)])

    print(f"\nlr={args.lr}: {len(losses)} steps, window = {monitor._window_size} sampled batches "
          f"= {window_steps} steps ({monitor._window_size * args.batch_size} images)")  # fmt: skip
    print(f"loss: start {statistics.median(losses[:5]):.3f}, end {loss_near(len(losses)):.3f} "
          f"(chance level ln 10 = {torch.log(torch.tensor(10.0)):.3f})")  # fmt: skip
    if monitor.alerts:
        first = monitor.alerts[0]["step"]
        print(f"first alert at step {first}: " + ", ".join(
            f"{a['site']} {a['fraction']:.0%} dead" for a in monitor.alerts if a["step"] == first))  # fmt: skip
        print(f"loss at the alert: {loss_near(first):.3f}; 2 windows later: {loss_near(first + 2 * window_steps):.3f}; "
              f"at the end: {loss_near(len(losses)):.3f}")  # fmt: skip
    else:
        print("no alert")
    if table.rows:
        sites = list(table.rows[0][2])
        print("after each window:  step   loss  " + "  ".join(f"{s.split('.')[-1]:>5s}" for s in sites)
              + "   (dead fraction per site: " + ", ".join(sites) + ")")  # fmt: skip
        for step, loss, dead in table.rows:
            marks = " <- alert" if any(a["step"] == step for a in monitor.alerts) else ""
            print(f"                   {step:5d}  {loss:5.3f}  " + "  ".join(f"{dead[s]:5.0%}" for s in sites) + marks)
    print("dead fraction per site after the last window:")
    for site, dead in monitor.dead_channels.items():
        channels = monitor.activity[site].numel()
        print(f"  {site:16s} {len(dead):4d} / {channels:3d} dead ({len(dead) / channels:.0%})")
    return {"alerts": monitor.alerts, "losses": losses, "dead": monitor.dead_channels, "windows": table.rows}


if __name__ == "__main__":
    main()
