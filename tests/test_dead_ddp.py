"""DeadNeuronMonitor under DDP (2 CPU processes, gloo): counts summed over ranks, one writer."""

import glob
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis.callbacks import DeadNeuronMonitor
from tests.helpers import pl, read_events

lib = pl("lightning.pytorch")


def _net() -> nn.Module:
    """1×1 conv, 3 channels: 0 fires on positive images only, 1 never fires (bias -1e4), 2 always fires."""
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.0, -1e4, 1.0]))
    return net


class SplitData(lib.LightningModule):
    """Rank 0 trains on constant images of -1, rank 1 on images of +1 (no distributed
    sampler): channel 0 is alive on rank 1 only."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        x = torch.full((16, 1, 6, 6), 1.0 if self.global_rank == 1 else -1.0)
        return DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=4)


class Report(lib.Callback):
    """Each rank writes what its monitor decided (the spawned processes' objects are not sent back)."""

    def __init__(self, monitor: DeadNeuronMonitor, path: str):
        self.monitor, self.path = monitor, path

    def on_train_end(self, trainer, pl_module):
        m = self.monitor
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"dead": m.dead_channels, "activity": {k: v.tolist() for k, v in m.activity.items()},
                       "windows": m.windows_completed, "alerts": m.alerts}, f)  # fmt: skip


def _fit(tmp_path):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.2)
    trainer = lib.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, deterministic=True,
        callbacks=[monitor, Report(monitor, str(tmp_path))], logger=lib.loggers.TensorBoardLogger(str(tmp_path)),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        use_distributed_sampler=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SplitData())


@pytest.mark.slow
def test_counts_summed_over_ranks_and_only_rank_zero_writes(tmp_path):
    try:
        _fit(tmp_path)
    except ProcessExitedException as err:
        # Seen about 1 run in 4 after the rest of the suite: a spawned child aborts while
        # starting (SIGABRT, before any of our code runs). Retry once in a fresh folder; the
        # assertions below are unchanged.
        if "SIGABRT" not in str(err):
            raise
        tmp_path = tmp_path / "retry"
        tmp_path.mkdir()
        _fit(tmp_path)
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert reports[0] == reports[1]  # decided on the same summed counts on every rank
    report = reports[0]
    assert report["windows"] == 2  # 16 samples per rank, 4 per batch: 4 steps
    assert report["dead"] == {"net.1": [1]}  # channel 0, alive on rank 1 only, is not dead
    assert report["activity"]["net.1"] == [0.5, 0.0, 1.0]
    assert [(a["step"], a["site"], a["channels"]) for a in report["alerts"]] == [(2, "net.1", [1])]
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1  # one writer: global rank 0
    events = read_events(tmp_path)
    assert [(s.step, round(s.value, 6)) for s in events.Scalars("dead/total")] == [(2, 0.333333), (4, 0.333333)]
    assert [e.step for e in events.Tensors("dead/alert/text_summary")] == [2]
