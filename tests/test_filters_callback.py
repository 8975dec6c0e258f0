"""FilterGrid in real Trainers: both Lightning packages, event files read back, invariants."""


import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_vis.callbacks import FilterGrid
from tests.helpers import PACKAGES, assert_bit_identical, fit_weights, make_module, read_events, small_cnn, trainer


@pytest.mark.parametrize("package", PACKAGES)
def test_fit_logs_filters_next_to_the_loss(tmp_path, package):
    cb = FilterGrid(every_n_steps=2)
    t = trainer(tmp_path, package, callbacks=[cb], max_epochs=2, limit_train_batches=3)
    t.fit(make_module(small_cnn(), package))
    assert cb.layer_name == "net.0"
    events = read_events(tmp_path)
    assert "train/loss" in events.Tags()["scalars"]
    images = events.Images("filters/net.0")
    # step 0 (init), every 2 steps of 6, and once at the end (step 6 already logged)
    assert [im.step for im in images] == [0, 2, 4, 6]
    first = images[0]
    assert first.width > 8 * 3 and first.height > 3  # 8 filters 3x3 upscaled


def test_first_applied_conv_is_the_default_not_the_first_registered(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Conv2d(8, 4, 3, padding=1)
            self.first = nn.Conv2d(3, 8, 5, padding=2)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))

        def forward(self, x):
            return self.head(self.second(torch.relu(self.first(x))))

    cb = FilterGrid()
    trainer(tmp_path, callbacks=[cb], limit_train_batches=1).fit(make_module(Net()))
    assert cb.layer_name == "net.first"
    assert "filters/net.first" in read_events(tmp_path).Tags()["images"]


def test_iterable_dataset_probe(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(8):
                yield torch.randn(3, 8, 8, generator=g), torch.randint(0, 4, (), generator=g)

    module = make_module(small_cnn())
    module.train_dataloader = lambda: DataLoader(Stream(), batch_size=4)
    module.val_dataloader = lambda: []
    cb = FilterGrid(every_n_steps=1)
    trainer(tmp_path, callbacks=[cb], limit_val_batches=0).fit(module)
    assert cb.layer_name == "net.0"
    assert [im.step for im in read_events(tmp_path).Images("filters/net.0")] == [0, 1, 2]


class Batch:
    """A batch type the probe sampler cannot look into."""

    def __init__(self, items):
        self.x = torch.stack([x for x, _ in items])
        self.y = torch.stack([y for _, y in items])


def test_default_layer_found_on_first_batch_when_no_images_can_be_sampled(tmp_path):
    module = make_module(small_cnn())
    data = list(zip(module.x, module.y))
    module.train_dataloader = lambda: DataLoader(data, batch_size=8, collate_fn=Batch)
    module.val_dataloader = lambda: []
    module.training_step = lambda batch, i=0: torch.nn.functional.cross_entropy(module(batch.x), batch.y)
    module.transfer_batch_to_device = lambda batch, device, i=0: batch
    cb = FilterGrid(every_n_steps=1)
    trainer(tmp_path, callbacks=[cb], limit_val_batches=0, limit_train_batches=2).fit(module)
    assert cb.layer_name == "net.0"
    assert [im.step for im in read_events(tmp_path).Images("filters/net.0")] == [1, 2]
    assert all(not m._forward_pre_hooks for m in module.modules())


def test_observer_does_not_change_the_experiment(tmp_path):
    plain = fit_weights(tmp_path / "a", small_cnn, max_epochs=2, limit_train_batches=3)
    watched = fit_weights(tmp_path / "b", small_cnn, [FilterGrid(every_n_steps=1)], max_epochs=2,
                          limit_train_batches=3)  # fmt: skip
    assert_bit_identical(plain, watched)


def test_explicit_layer_and_zero_filters_marked(tmp_path):
    net = small_cnn()
    with torch.no_grad():
        net[4].weight[3] = 0.0  # a zero filter in the second conv
    cb = FilterGrid(layer="net.4", every_n_steps=None, cell_px=6)
    module = make_module(net, lr=0.0)
    trainer(tmp_path, callbacks=[cb], limit_train_batches=1).fit(module)
    images = read_events(tmp_path).Images("filters/net.4")
    assert [im.step for im in images] == [0, 1]
    from PIL import Image
    import io

    pixels = torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(images[0].encoded_image_string))))
    red = ((pixels[..., 0] > 200) & (pixels[..., 1] < 50) & (pixels[..., 2] < 50)).sum().item()
    assert red > 0  # the zero filter's frame


def test_no_tensorboard_logger_warns_once_and_trains(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = FilterGrid(every_n_steps=1)
    t = trainer(tmp_path, callbacks=[cb], logger=CSVLogger(str(tmp_path)), limit_train_batches=2)
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        t.fit(make_module(small_cnn()))
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1


def test_logger_false_warns(tmp_path):
    t = trainer(tmp_path, callbacks=[FilterGrid(every_n_steps=1)], logger=False, limit_train_batches=1)
    with pytest.warns(UserWarning, match="no logger"):
        t.fit(make_module(small_cnn()))


@pytest.mark.parametrize(
    "layer, message",
    [
        ("net.nope", r"No module 'net\.nope' in Tiny; convolutions are: 'net\.0', 'net\.4'"),
        ("net.2", r"Module 'net\.2' \(ReLU\) cannot be used here"),
        ("net.*", r"FilterGrid shows one convolution, but layer='net\.\*' matches 2"),
        ("conv*", r"Pattern 'conv\*' matches nothing"),
    ],
)
def test_bad_layers_fail_at_setup_before_training(tmp_path, layer, message):
    module = make_module(small_cnn())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, callbacks=[FilterGrid(layer=layer)]).fit(module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_model_without_convolution_fails_at_setup(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(ValueError, match="has no convolution"):
        trainer(tmp_path, callbacks=[FilterGrid()]).fit(make_module(net))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_steps": 0}, r"every_n_steps=0\. Must be an int >= 1"),
        ({"every_n_steps": -5}, r"every_n_steps=-5"),
        ({"normalize": "global"}, r"normalize='global'\. Must be one of 'filter', 'layer'"),
        ({"cell_px": 0}, r"cell_px=0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FilterGrid(**kwargs)
    with pytest.raises(TypeError, match="layer must be"):
        FilterGrid(layer=3)


def test_state_key_distinguishes_layers_and_state_round_trips():
    a, b = FilterGrid(layer="net.0"), FilterGrid(layer="net.4")
    assert a.state_key != b.state_key
    a._last_step, a._layer_name = 7, "net.0"
    c = FilterGrid(layer="net.0")
    c.load_state_dict(a.state_dict())
    assert c._last_step == 7 and c.layer_name == "net.0"


def test_grayscale_cnn(tmp_path):
    cb = FilterGrid(every_n_steps=1)
    trainer(tmp_path, callbacks=[cb], limit_train_batches=1).fit(make_module(small_cnn(in_channels=1), channels=1))
    assert cb.layer_name == "net.0"
    assert "filters/net.0" in read_events(tmp_path).Tags()["images"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, first",
    [
        ("resnet18", "net.conv1"),
        ("vgg11_bn", "net.features.0"),
        ("mobilenet_v3_small", "net.features.0.0"),
        ("efficientnet_b0", "net.features.0.0"),
    ],
)
def test_torchvision_models(tmp_path, arch, first):
    net = getattr(torchvision.models, arch)(weights=None, num_classes=4)
    cb = FilterGrid(every_n_steps=1)
    module = make_module(net, n=8, size=32, batch_size=4)
    trainer(tmp_path, callbacks=[cb], limit_train_batches=1, limit_val_batches=1).fit(module)
    assert cb.layer_name == first
    assert [im.step for im in read_events(tmp_path).Images(f"filters/{first}")] == [0, 1]
