"""DeadNeuronMonitor under DDP (2 CPU processes, gloo): counts summed over ranks, one writer.

The training runs in a fresh interpreter (the subprocess pattern of ``tests/ddp_script.py``):
``ddp_spawn`` started from inside the pytest process inherited its state and aborted now
and then while starting; a subprocess starts clean every time, so there is no retry.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = '''
import json, os, sys, warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as lib
from lightning_vis.callbacks import DeadNeuronMonitor

logdir = sys.argv[1]


def _net():
    """1x1 conv, 3 channels: 0 fires on positive images only, 1 never fires (bias -1e4), 2 always fires."""
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
    """Each rank writes what its monitor decided."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_train_end(self, trainer, pl_module):
        m = self.monitor
        with open(os.path.join(logdir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"dead": m.dead_channels, "activity": {k: v.tolist() for k, v in m.activity.items()},
                       "windows": m.windows_completed, "alerts": m.alerts}, f)


if __name__ == "__main__":
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.2)
    trainer = lib.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, deterministic=True,
        callbacks=[monitor, Report(monitor)], logger=lib.loggers.TensorBoardLogger(logdir),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SplitData())
'''


@pytest.mark.slow
def test_counts_summed_over_ranks_and_only_rank_zero_writes(tmp_path):
    script = tmp_path / "dead_ddp.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
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
