"""DeadNeuronMonitor in real Trainers: planted dead channels, the dying-ReLU oracle, invariants."""

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis import render
from lightning_vis.callbacks import DeadNeuronMonitor, FilterGrid
from lightning_vis.demo import DemoModule
from tests.helpers import PACKAGES, assert_bit_identical, fit_weights, make_module, pl, read_events, small_cnn, trainer


@pytest.fixture(autouse=True)
def one_thread_seeded():
    """Tiny models: one thread avoids OpenMP oversubscription on a shared CPU; nets start from seed 0."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


# ---------------------------------------------------------------------------- nets with planted dead channels
class ModuleReluNet(nn.Sequential):
    """``nn.ReLU`` modules; conv biases -1e4 plant dead channels: ``net.1`` {1, 5}, ``net.3`` {3}."""

    planted = {"net.1": [1, 5], "net.3": [3]}
    feeds = {"net.0": [1, 5], "net.2": [3]}

    def __init__(self, plant: bool = True, activation=nn.ReLU):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), activation(), nn.Conv2d(8, 8, 3, padding=1), activation(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        )  # fmt: skip
        if plant:
            with torch.no_grad():
                self[0].bias[[1, 5]] = -1e4
                self[2].bias[3] = -1e4


class FunctionalNet(nn.Module):
    """``F.relu`` and in-place ``F.relu`` inside ``forward``: sites ``net#0``, ``net#1``."""

    planted = {"net#0": [0, 6], "net#1": [2]}
    feeds = {"net.conv1": [0, 6], "net.conv2": [2]}

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv1.bias[[0, 6]] = -1e4
            self.conv2.bias[2] = -1e4

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x), inplace=True)
        return self.head(x.mean(dim=(2, 3)))


class ResidualNet(nn.Module):
    """ResNet BasicBlock: a reused in-place ``self.relu`` after BatchNorm, with a residual add.

    BatchNorm β = -1e4 plants dead channels: ``net.relu#0`` {2}, ``net.relu#1`` {6} (after the add).
    """

    planted = {"net.relu#0": [2], "net.relu#1": [6]}
    feeds = {"net.conv1": [2], "net.conv2": [6]}

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn1.bias[2] = -1e4
            self.bn2.bias[6] = -1e4

    def forward(self, x):
        identity = self.stem(x)
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.relu(self.bn2(self.conv2(out)) + identity)
        return self.head(out.mean(dim=(2, 3)))


def _fit(tmp_path, net, monitor, package="lightning.pytorch", *, extra=(), **kwargs):
    module = make_module(net, package, lr=0.01)
    t = trainer(tmp_path, package, callbacks=[monitor, *extra], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module)
    return t, module, [str(w.message) for w in caught]


def _no_hooks_left(module):
    assert torch._C._len_torch_function_stack() == 0
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name


@pytest.mark.parametrize(
    "make_net", [ModuleReluNet, FunctionalNet, ResidualNet], ids=["modules", "functional", "resnet"]
)
def test_planted_dead_channels_found_exactly(tmp_path, make_net):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    fg = FilterGrid(layer=next(iter(make_net.feeds)), every_n_steps=100)
    t, module, _ = _fit(tmp_path, make_net(), monitor, extra=[fg])
    planted = make_net.planted
    assert monitor.sites == list(planted)
    assert monitor.windows_completed == 2
    assert monitor.dead_channels == planted  # precision = recall = 1
    assert all(not v for v in monitor.dying_channels.values())
    assert monitor.saturated_channels == {}
    for site, dead in planted.items():
        rate = monitor.activity[site]
        assert rate[dead].eq(0).all() and rate[[c for c in range(rate.numel()) if c not in dead]].gt(0.5).all()
    for conv, dead in make_net.feeds.items():  # FilterGrid's lookup of the filters to frame in red
        assert monitor.dead_filters(conv) == dead
    assert fg._dead_filters(t) == set(make_net.feeds[fg.layer_name])
    _no_hooks_left(module)


def test_healthy_net_reports_nothing(tmp_path):
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.0)
    _, module, messages = _fit(tmp_path, net, monitor, max_epochs=2)
    assert monitor.sites == ["net.2", "net.6"] and monitor.windows_completed == 4
    assert monitor.dead_channels == monitor.dying_channels == {"net.2": [], "net.6": []}
    assert monitor.alerts == [] and not any("DeadNeuronMonitor" in m for m in messages)
    assert read_events(tmp_path).Scalars("dead/total")[-1].value == 0.0


def test_unnormalised_net_has_no_dead_channels(tmp_path):
    # without BatchNorm before its second ReLU, a random init can leave channels *dormant*
    # (firing, but with a mean under 2.5% of the layer's: ReDo's "dying"); none is dead
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.0)
    _fit(tmp_path, small_cnn(), monitor, max_epochs=2)
    assert monitor.dead_channels == {"net.2": [], "net.5": []} and monitor.alerts == []
    for site, dying in monitor.dying_channels.items():
        assert (monitor.states[site].score[dying] <= 0.025).all() and (monitor.activity[site][dying] > 0.1).all()


@pytest.mark.parametrize("package", PACKAGES)
def test_event_file_and_alert(tmp_path, package):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.2)
    fg = FilterGrid(layer="net.0", every_n_steps=2)
    t, module, messages = _fit(tmp_path, ModuleReluNet(), monitor, package, extra=[fg])
    alerts = [m for m in messages if m.startswith("DeadNeuronMonitor at step")]
    assert len(alerts) == 1  # one warning, at the first window; not repeated while the site stays dead
    assert "step 2" in alerts[0] and "'net.0 → net.1'" in alerts[0] and "channels 1, 5" in alerts[0]
    assert "'net.3'" not in alerts[0]  # 1/8 dead: under alert_fraction
    assert monitor.alerts == [{"step": 2, "site": "net.1", "fraction": 0.25, "channels": [1, 5]}]
    events = read_events(tmp_path)
    tags = events.Tags()
    for tag, value in (("dead/net.1", 0.25), ("dead/net.3", 0.125), ("dead/total", 3 / 16)):
        assert [(s.step, s.value) for s in events.Scalars(tag)] == [(2, value), (4, value)]
    assert "dead/dying/net.1" in tags["scalars"]
    assert [e.step for e in events.Images("dead/activity")] == [2, 4]
    assert {"dead/rates/net.1", "dead/rates/net.3"} <= set(tags["histograms"])
    text = events.Tensors("dead/alert/text_summary")
    assert [e.step for e in text] == [2] and b"net.1" in text[0].tensor_proto.string_val[0]
    # FilterGrid (after the monitor in the list) framed filters 1 and 5 of net.0 in red at step 4
    image = events.Images("filters/net.0")[-1]
    assert image.step == 4
    logged = torch.from_numpy(np.array(Image.open(io.BytesIO(image.encoded_image_string))))
    expected = render.filter_grid(module.net[0].weight.detach(), dead=[1, 5])
    assert torch.equal(logged[..., :3].permute(2, 0, 1), expected)
    _no_hooks_left(module)


def test_revived_channel_loses_its_flag(tmp_path):
    class Revive(pl().Callback):  # after the first window, open channel 1 again
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.windows_completed > len(self.seen):
                self.seen.append((dict(monitor.dead_channels), dict(monitor.dying_channels)))
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[0].bias[1] = 0.5

    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    revive = Revive()
    _fit(tmp_path, ModuleReluNet(), monitor, extra=[revive])
    (dead1, dying1), (dead2, dying2) = revive.seen
    assert dead1["net.1"] == [1, 5] and monitor._flagged["net.1"].tolist() == [i in (5,) for i in range(8)]
    assert dead2["net.1"] == [5] and dying2["net.1"] == []


def test_dying_relu_alert_within_one_window_of_the_oracle(tmp_path):
    """An independent oracle (its own forward hooks) finds when the dead fraction passes the threshold."""
    lib = pl()
    lib.seed_everything(0, verbose=False)
    module = DemoModule(batchnorm=False, lr=0.3, momentum=0.9, weight_decay=0.0, width=8, image_size=16,
                        train_size=512, val_size=32, batch_size=32)  # fmt: skip
    window, alert = 4, 0.25
    fired: dict[str, list[torch.Tensor]] = {}

    def oracle(name):
        def hook(m, args, out):
            if m.training:
                fired.setdefault(name, []).append((out.detach().amax(dim=(2, 3)) > 0).any(0))

        return hook

    relus = {f"net.features.{i}": m for i, m in enumerate(module.net.features) if isinstance(m, nn.ReLU)}
    handles = [m.register_forward_hook(oracle(name)) for name, m in relus.items()]
    monitor = DeadNeuronMonitor(every_n_steps=1, window=window, alert_fraction=alert)
    t = trainer(tmp_path, callbacks=[monitor], max_epochs=4, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module)
    for h in handles:
        h.remove()
    steps = len(fired["net.features.1"])
    assert steps == t.global_step == 64

    def dead_over(site, start, stop):  # channels that fired on no sample of forwards [start, stop)
        return (~torch.stack(fired[site][start:stop]).any(0)).nonzero().flatten().tolist()

    def passes(stop):  # sites whose dead fraction over the `window` forwards before `stop` passes `alert`
        return [s for s in relus if len(dead_over(s, stop - window, stop)) / len(fired[s][0]) > alert]

    # the monitor decides on consecutive windows of `window` counted steps: [0, 4), [4, 8), ...
    crossing = next(stop for stop in range(window, steps + 1, window) if passes(stop))
    assert monitor.alerts, "the monitor raised no alert"
    first = monitor.alerts[0]["step"]
    assert first == crossing  # at the end of the first window that passes, never before
    for a in monitor.alerts:  # and the channels it names are exactly the oracle's
        assert a["channels"] == dead_over(a["site"], a["step"] - window, a["step"])
    assert {a["site"] for a in monitor.alerts if a["step"] == first} == set(passes(first))


def test_bit_identical_weights_with_and_without_the_monitor(tmp_path):
    plain = fit_weights(tmp_path / "a", small_cnn, max_epochs=2)
    watched = fit_weights(tmp_path / "b", small_cnn, [DeadNeuronMonitor(every_n_steps=1, window=2)], max_epochs=2)
    assert_bit_identical(plain, watched)


def test_hooks_and_mode_removed_after_an_exception_in_training_step(tmp_path):
    class Boom(nn.Module):
        calls = 0

        def forward(self, x):
            if self.training:
                Boom.calls += 1
                if Boom.calls == 2:
                    raise RuntimeError("boom in forward")
            return x

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Boom(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.zeros(1, 3, 16, 16))
    module = make_module(net)
    t = trainer(tmp_path, callbacks=[DeadNeuronMonitor(every_n_steps=1, window=4)])
    with pytest.raises(RuntimeError, match="boom in forward"):
        t.fit(module)
    _no_hooks_left(module)


def test_state_dict_round_trip_and_resume_mid_window(tmp_path):
    first = DeadNeuronMonitor(every_n_steps=1, window=3)
    net = ModuleReluNet()
    _fit(tmp_path / "a", net, first)  # 4 steps: one window, then one batch of the next
    state = first.state_dict()
    assert state["window_batches"] == 1 and state["windows_completed"] == 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what a checkpoint holds loads safely
    second = DeadNeuronMonitor(every_n_steps=1, window=3)
    second.load_state_dict(state)
    assert second.dead_channels == first.dead_channels == ModuleReluNet.planted
    assert all(torch.equal(second.activity[k], first.activity[k]) for k in first.activity)
    _fit(tmp_path / "b", net, second, limit_train_batches=2)  # 1 + 2 batches complete the window
    assert second.windows_completed == 2 and second.dead_channels == ModuleReluNet.planted
    assert int(second.state_dict()["counts"]["net.1"]["packed"][0]) == 0  # counters reset at window end
    other = DeadNeuronMonitor(every_n_steps=2, window=3)
    assert other.state_key != first.state_key
    copy = pickle.loads(pickle.dumps(second))  # picklable after fit (ddp_spawn, checkpoints of callbacks)
    assert copy.dead_channels == second.dead_channels and copy._root is None


def test_stop_on_dead_stops_training(tmp_path):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2, alert_fraction=0.2, stop_on_dead=True)
    t, _, messages = _fit(tmp_path, ModuleReluNet(), monitor, max_epochs=5)
    assert t.global_step == 2 and monitor.stopped_step == 2
    assert any("Stopping training (stop_on_dead=True)" in m for m in messages)


def test_layers_filter_and_reused_module_name(tmp_path):
    monitor = DeadNeuronMonitor(layers="net.3", every_n_steps=1, window=2)
    _fit(tmp_path / "a", ModuleReluNet(), monitor)
    assert monitor.sites == ["net.3"] and monitor.dead_channels == {"net.3": [3]}
    monitor = DeadNeuronMonitor(layers=["net.relu"], every_n_steps=1, window=2)  # both calls of the module
    _fit(tmp_path / "b", ResidualNet(), monitor)
    assert monitor.sites == ["net.relu#0", "net.relu#1"]


def test_unknown_layer_fails_before_the_first_step(tmp_path):
    net = ModuleReluNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    module = make_module(net)
    t = trainer(tmp_path, callbacks=[DeadNeuronMonitor(layers=["net.9"])])
    with pytest.raises(ValueError, match=r"'net\.9' names no activation site of Tiny.*: 'net\.0 → net\.1', 'net\.2 → net\.3'"):
        t.fit(module)
    assert t.global_step == 0
    assert_bit_identical(before, net.state_dict())
    _no_hooks_left(module)
    with pytest.raises(ValueError, match=r"'net' names no activation site of Tiny"):
        trainer(tmp_path, callbacks=[DeadNeuronMonitor(layers="net")]).fit(make_module(ModuleReluNet()))
    # a convolution names the sites it feeds
    monitor = DeadNeuronMonitor(layers="net.2", every_n_steps=1, window=1)
    trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(make_module(ModuleReluNet()))
    assert monitor.sites == ["net.3"]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"every_n_steps=0\. Must be an int >= 1"):
        DeadNeuronMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match=r"window=-1\. Must be an int >= 1 or None"):
        DeadNeuronMonitor(window=-1)
    with pytest.raises(ValueError, match=r"alert_fraction=1\.5\. Must be a number in \[0, 1\)"):
        DeadNeuronMonitor(alert_fraction=1.5)
    with pytest.raises(ValueError, match=r"revive_rate=0\.005\. Must be >= dying_rate=0\.01"):
        DeadNeuronMonitor(revive_rate=0.005)
    with pytest.raises(ValueError, match=r"saturation=0\. Must be a number in \(0, 1\]"):
        DeadNeuronMonitor(saturation=0)
    with pytest.raises(TypeError, match="stop_on_dead must be True or False, got 'yes'"):
        DeadNeuronMonitor(stop_on_dead="yes")
    with pytest.raises(TypeError, match="layer names must be strings, got int: 3"):
        DeadNeuronMonitor(layers=["net.1", 3])


def test_efficient_activations_and_nothing_to_watch(tmp_path):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)  # SiLU: fired = output > 0
    _fit(tmp_path / "a", ModuleReluNet(activation=nn.SiLU), monitor)
    assert monitor.dead_channels == ModuleReluNet.planted
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    t, _, messages = _fit(tmp_path / "b", net, monitor)
    assert t.global_step == 4 and monitor.sites == [] and monitor.dead_channels == {}
    assert sum("calls no activation that can be watched" in m for m in messages) == 1


def test_bounded_activation_saturation(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with torch.no_grad():
        net[0].bias[2] = 50.0  # tanh(>>1): stuck at +1
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    _fit(tmp_path, net, monitor)
    assert monitor.saturated_channels == {"net.1": [2]} and monitor.dead_channels == {}
    assert "dead/saturated/net.1" in read_events(tmp_path).Tags()["scalars"]


def test_bf16_autocast_channels_last(tmp_path):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=2)
    net = ModuleReluNet().to(memory_format=torch.channels_last)
    _fit(tmp_path, net, monitor, precision="bf16-mixed")
    assert monitor.dead_channels == ModuleReluNet.planted


def test_sites_found_on_the_first_batch_when_the_module_has_no_forward(tmp_path):
    class NoForward(pl().LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ModuleReluNet()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(48, 3, 12, 12, generator=g), torch.randint(0, 4, (48,))),
                              batch_size=16)  # fmt: skip

    monitor = DeadNeuronMonitor(every_n_steps=1, window=3)
    module = NoForward()
    trainer(tmp_path, callbacks=[monitor]).fit(module)
    assert monitor.sites == ["net.1", "net.3"] and monitor.windows_completed == 1
    assert monitor.dead_channels == ModuleReluNet.planted  # the discovery batch counted too
    _no_hooks_left(module)


def test_activity_heatmap_marks_dead_channels_in_red():
    img = render.activity_heatmap({"a": torch.tensor([0.0, 1.0, 0.01]), "b.long.name": torch.tensor([1.0])})
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    pixels = {tuple(p) for p in img.permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert (230, 26, 26) in pixels  # dead: red
    assert (237, 237, 237) in pixels  # padding of the shorter row: light grey
    healthy = render.activity_heatmap({"a": torch.tensor([1.0, 0.5])})
    grid, legend = healthy[:, :-32], healthy[:, -32:]  # the colour scale (with its red "dead" box) is below
    assert (230, 26, 26) not in {tuple(p) for p in grid.permute(1, 2, 0).reshape(-1, 3).tolist()}
    assert (230, 26, 26) in {tuple(p) for p in legend.permute(1, 2, 0).reshape(-1, 3).tolist()}
    with pytest.raises(ValueError, match="at least one site"):
        render.activity_heatmap({})
    with pytest.raises(ValueError, match=r"floor=0\. Must be in \(0, 1\)"):
        render.activity_heatmap({"a": torch.ones(2)}, floor=0)
    with pytest.raises(ValueError, match="Unknown colour map cmap='nope'"):
        render.activity_heatmap({"a": torch.ones(2)}, cmap="nope")


def test_short_run_without_a_complete_window_says_so(tmp_path):
    monitor = DeadNeuronMonitor(every_n_steps=1, window=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=[monitor], limit_train_batches=3).fit(make_module(small_cnn()))
    said = [str(w.message) for w in caught if "before the first window was complete" in str(w.message)]
    assert len(said) == 1 and "3 of 100 sampled batches" in said[0]
    assert monitor.windows_completed == 0
