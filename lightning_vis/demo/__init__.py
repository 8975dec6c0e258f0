"""The demo: the built-in CNN trained on generated shapes with every lightning_vis callback.

Run it with ``lightning-vis demo --logdir runs`` or ``python -m lightning_vis.demo``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from lightning_vis.demo.data import CLASSES, ShapesDataset, make_shapes
from lightning_vis.demo.model import DemoCNN, DemoModule, lightning_package

__all__ = ["CLASSES", "DemoCNN", "DemoModule", "ShapesDataset", "demo_callbacks", "make_shapes", "run_demo"]


def demo_callbacks(epochs: int = 12) -> list:
    """Every lightning_vis callback: :func:`lightning_vis.callbacks.suite`, with demo settings.

    Where the demo differs from the suite's defaults: the embedding projector every 2 epochs
    (6 snapshots in 12), and activation maximisation and feature inversion once, at the end
    of training, with more steps and a 64-px canvas (sharper pictures than the periodic
    defaults, which stay within the per-run budget).
    """
    from lightning_vis import callbacks

    return callbacks.suite(options={
        "ClassAttribution": {"methods": ("gradcam", "occlusion"), "options": {"occlusion": {"patch": 8, "stride": 4}}},
        "EmbeddingProjector": {"every_n_epochs": 2},
        "ActivationMaximization": {"layers": "net.features.12", "num_units": 9, "size": 64, "steps": 192,
                                   "every_n_epochs": epochs},
        "FeatureInversion": {"layers": ["net.features.3", "net.features.8"], "steps": 128, "every_n_epochs": epochs},
    })  # fmt: skip


def run_demo(
    logdir: str = "runs",
    *,
    epochs: int = 12,
    train_size: int = 16384,
    batch_size: int = 64,
    seed: int = 0,
    callbacks: bool | list = True,
    extra_callbacks: list | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """Train the demo CNN; returns the Trainer. Prints the ``tensorboard`` line at the end.

    ``callbacks``: ``True`` for every lightning_vis callback at its defaults, ``False``
    for none, or a list of callbacks to use instead.
    """
    pl = lightning_package()
    pl.seed_everything(seed, workers=True, verbose=False)
    model = DemoModule(train_size=train_size, batch_size=batch_size, seed=seed)
    logger = pl.loggers.TensorBoardLogger(logdir, name="demo")
    chosen = list(callbacks) if isinstance(callbacks, (list, tuple)) else demo_callbacks(epochs) if callbacks else []
    cbs = chosen + list(extra_callbacks or [])
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=cbs,
        accelerator="cpu",
        deterministic=True,
        log_every_n_steps=10,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(model)
    took = time.perf_counter() - start
    if trainer.is_global_zero:
        print(f"\nTrained {epochs} epoch{'s' * (epochs != 1)} in {took:.0f} s; logs in {os.path.abspath(logger.log_dir)}")
        print("Look at it with:\n")
        print(f"    tensorboard --logdir {logdir}\n")
        print("(add --samples_per_plugin images=100 to step through every logged image)")
    return trainer
