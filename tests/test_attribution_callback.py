"""``ClassAttribution``: real ``Trainer.fit`` runs, TensorBoard read back, bit-identical training."""

from __future__ import annotations

import importlib
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_vis import attribute
from lightning_vis.callbacks import ClassAttribution

PACKAGES = []
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        PACKAGES.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover
        pass
IDS = [p.__name__ for p in PACKAGES]
CLASSES = ["disc", "bar", "ring"]


class Shapes(Dataset):
    """Generated images with labels, class names and a random flip (RNG restoration matters)."""

    classes = CLASSES

    def __init__(self, n: int, seed: int, augment: bool):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 12, 16, generator=g)  # non-square
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.augment = augment

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def make_module(pl, *, out: str = "logits", fail_at_step: int | None = None):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            )  # fmt: skip
            self.drop = nn.Dropout(0.3)
            self.head = nn.Linear(8, 3)
            self.steps = 0

        def forward(self, x):
            logits = self.head(self.drop(F.relu(self.net(x)).mean((2, 3))))
            return {"logits": logits} if out == "dict" else logits

        def training_step(self, batch, batch_idx):
            self.steps += 1
            if fail_at_step is not None and self.steps >= fail_at_step:
                raise RuntimeError("planted failure")
            x, y = batch
            out = self(x)
            return F.cross_entropy(out["logits"] if isinstance(out, dict) else out, y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(Shapes(32, 0, True), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(Shapes(16, 1, False), batch_size=8)

    return Tiny()


def fit(pl, tmp_path, callbacks, *, epochs=2, logger="tb", seed=0, **module_kwargs):
    pl.seed_everything(seed, workers=True, verbose=False)
    model = make_module(pl, **module_kwargs)
    if logger == "tb":
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, log_every_n_steps=1, num_sanity_val_steps=0,
        logger=logger, callbacks=callbacks, accelerator="cpu", deterministic=True, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model)
    return trainer, model


def read_images(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc


def decode(event) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def no_hooks(model):
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules()) and (
        torch._C._len_torch_function_stack() == 0
    )


@pytest.mark.parametrize("pl", PACKAGES, ids=IDS)
def test_fit_logs_attribution_images(pl, tmp_path):
    cb = ClassAttribution(methods=("gradcam", "occlusion"), num_probe=6, options={"occlusion": {"patch": 4}})
    trainer, model = fit(pl, tmp_path, [cb])
    val = Shapes(16, 1, False)
    assert torch.equal(cb.probe_images, val.x[:6]) and torch.equal(cb.probe_labels, val.y[:6])
    assert cb.layer_name == "net"  # the last convolution-bearing layer with a spatial output
    acc = read_images(trainer.logger.log_dir)
    assert sorted(t for t in acc.Tags()["images"] if t.startswith("attribution/")) == [
        "attribution/gradcam",
        "attribution/occlusion",
    ]
    events = acc.Images("attribution/gradcam")
    assert [e.step for e in events] == [3, 6]  # end of each epoch, at the optimizer step
    pixels = decode(events[-1])
    assert pixels.shape[0] >= 2 * 64 and pixels.shape[1] >= 4 * 64 and pixels.std() > 10
    assert 0.5 < pixels.shape[0] / pixels.shape[1] < 2  # close to square
    description = acc.SummaryMetadata("attribution/gradcam").summary_description
    assert "Grad-CAM" in description and "`net`" in description and "red: wrong" in description
    assert "occlusion" in acc.SummaryMetadata("attribution/occlusion").summary_description
    # the captions: the final model's predictions with probabilities, class names from the dataset
    model.eval()
    with torch.no_grad():
        logits = model(val.x[:6])
    captions, wrong = cb._captions(logits, val.y[:6])
    p, pred = torch.softmax(logits, 1).max(1)
    assert captions[0] == [f"pred {CLASSES[pred[0]]} {float(p[0]):.0%}", f"true {CLASSES[val.y[0]]}"]
    assert wrong == (pred != val.y[:6]).tolist()
    assert no_hooks(model)


def test_logged_maps_are_the_pure_functions(tmp_path):
    """The picture shows attribute()'s map: a probe whose map is known gives the known overlay."""
    pl = PACKAGES[0]
    probe = torch.randn(2, 3, 12, 16)
    cb = ClassAttribution(probe, methods="gradcam++", labels=[0, 2], target="label", every_n_epochs=1, cell_px=48)
    trainer, model = fit(pl, tmp_path, [cb], epochs=1)
    acc = read_images(trainer.logger.log_dir)
    pixels = decode(acc.Images("attribution/gradcam++")[-1]).astype(np.float32) / 255
    from lightning_vis import render

    ref = attribute(model, probe, targets=[0, 2], method="gradcam++", layer="net")
    logits = ref.logits
    captions, wrong = cb._captions(logits, torch.tensor([0, 2]))
    expected = render.attribution_panel(probe, ref.maps, captions, wrong=wrong, cell_px=48).permute(1, 2, 0).numpy()
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected / 255).max() < 2 / 255


@pytest.mark.slow
@pytest.mark.parametrize("pl", PACKAGES, ids=IDS)
def test_training_is_bit_identical(pl, tmp_path):
    """Seeded deterministic run with and without the callback (BN, dropout, momentum, random flips)."""
    _, plain = fit(pl, tmp_path / "a", [])
    cb = ClassAttribution(methods=("gradcam", "scorecam", "guided-gradcam", "occlusion"), every_n_steps=1)
    _, watched = fit(pl, tmp_path / "b", [cb])
    ref, got = plain.state_dict(), watched.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    events = read_images(tmp_path / "b" / "run" / "version_0").Images("attribution/scorecam")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]  # every step; the epoch ends do not repeat them


def test_state_round_trip_and_state_key(tmp_path):
    a, b = ClassAttribution(), ClassAttribution(methods=("gradcam", "occlusion"))
    c = ClassAttribution(layer="net.4")
    assert len({a.state_key, b.state_key, c.state_key}) == 3
    pl = PACKAGES[0]
    cb = ClassAttribution(methods=("cam", "saliency"), every_n_epochs=1)
    fit(pl, tmp_path, [cb], epochs=1)
    state = cb.state_dict()
    resumed = ClassAttribution(methods=("cam", "saliency"))
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert torch.equal(resumed.probe_images, cb.probe_images)
    assert torch.equal(resumed.probe_labels, cb.probe_labels)
    assert resumed._last_step == 3
    fresh = ClassAttribution(torch.randn(2, 3, 8, 8), methods=("cam", "saliency"), labels=[1, 0])
    copy = pickle.loads(pickle.dumps(fresh))  # picklable: configuration and tensors only
    assert copy.methods == ("cam", "saliency") and torch.equal(copy.probe_labels, torch.tensor([1, 0]))


@pytest.mark.slow
def test_checkpoint_resume_keeps_the_probe_and_the_cadence(tmp_path):
    pl = PACKAGES[0]
    pl.seed_everything(0, verbose=False)
    cb = ClassAttribution(every_n_epochs=1)
    model = make_module(pl)
    common = dict(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                  enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb], default_root_dir=str(tmp_path),
                         logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="run"), **common)  # fmt: skip
    trainer.fit(model)
    ckpt = str(tmp_path / "end.ckpt")
    trainer.save_checkpoint(ckpt)
    probe = torch.randn(3, 3, 12, 16)
    again = ClassAttribution(every_n_epochs=1)  # a new instance takes the saved probe
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer2 = pl.Trainer(max_epochs=2, callbacks=[again], default_root_dir=str(tmp_path), logger=logger, **common)
    trainer2.fit(make_module(pl), ckpt_path=ckpt)
    assert torch.equal(again.probe_images, cb.probe_images) and not torch.equal(again.probe_images[:3], probe)
    events = read_images(trainer2.logger.log_dir).Images("attribution/gradcam")
    assert [e.step for e in events] == [3, 6]


def test_bad_arguments():
    listed = r"'cam', 'gradcam', 'gradcam\+\+', 'scorecam', 'saliency', 'guided', 'guided-gradcam', 'occlusion'"
    with pytest.raises(ValueError, match=rf"methods: 'grad-cam'. Must be among {listed}"):
        ClassAttribution(methods=("gradcam", "grad-cam"))
    with pytest.raises(ValueError, match="names a method twice"):
        ClassAttribution(methods=("gradcam", "gradcam"))
    with pytest.raises(ValueError, match="at least one method"):
        ClassAttribution(methods=())
    with pytest.raises(ValueError, match=r"target='true'. Must be one of 'predicted', 'label'"):
        ClassAttribution(target="true")
    with pytest.raises(ValueError, match=r"options for 'occlusion', which is not among methods"):
        ClassAttribution(options={"occlusion": {"patch": 4}})
    with pytest.raises(ValueError, match=r"Invalid options for 'occlusion': 'size'. It takes: patch, stride"):
        ClassAttribution(methods="occlusion", options={"occlusion": {"size": 4}})
    with pytest.raises(ValueError, match="never logs"):
        ClassAttribution(every_n_epochs=None)
    with pytest.raises(ValueError, match=r"every_n_steps=0"):
        ClassAttribution(every_n_steps=0)
    with pytest.raises(ValueError, match=r"num_probe=0"):
        ClassAttribution(num_probe=0)
    with pytest.raises(ValueError, match=r"cell_px=8"):
        ClassAttribution(cell_px=8)
    with pytest.raises(ValueError, match="labels= describes a user probe"):
        ClassAttribution(labels=[0, 1])
    with pytest.raises(ValueError, match=r"labels must be 2 ints"):
        ClassAttribution(torch.zeros(2, 3, 8, 8), labels=[0, 1, 2])
    with pytest.raises(TypeError, match="class_names must be a sequence of strings"):
        ClassAttribution(class_names="abc")
    with pytest.raises(TypeError, match="probe must be a float tensor"):
        ClassAttribution(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize(
    "kwargs,module_kwargs,error",
    [
        (dict(layer="net.9"), {}, r"No module 'net.9' in Tiny; convolutions are: 'net.0', 'net.4'"),
        (dict(layer="head"), {}, r"Layer 'head' has no spatial output"),
        (dict(methods="occlusion", options={"occlusion": {"patch": (13, 2)}}), {}, r"patch=\(13, 2\): larger than"),
        (dict(), {"out": "dict"}, r"The output of Tiny is dict, not class scores.*pass score="),
        (dict(probe=torch.randn(2, 3, 12, 16), labels=[0, 5], target="label"), {},
         r"labels \[5\] out of range: the model has 3 classes"),
        (dict(probe=torch.randn(2, 3, 12, 16), labels=[0, 7]), {}, r"labels \[7\] out of range"),
        (dict(probe=torch.randn(2, 3, 12, 16), target="label"), {}, r"target='label'\) needs the probe's labels"),
        (dict(probe=torch.randn(2, 4, 12, 16)), {}, r"probe of shape \(2, 4, 12, 16\) does not fit Tiny"),
        (dict(methods="cam", layer="net.4"), {}, r"method='cam' needs a global-average-pool -> linear head"),
    ],
)
def test_bad_input_fails_before_step_one(tmp_path, kwargs, module_kwargs, error):
    pl = PACKAGES[0]
    pl.seed_everything(0, verbose=False)
    model = make_module(pl, **module_kwargs)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False,
                         callbacks=[ClassAttribution(**kwargs)], accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match=error):
        trainer.fit(model)
    assert model.steps == 0 and trainer.global_step == 0
    assert no_hooks(model)


def test_score_callable_for_a_dict_output(tmp_path):
    pl = PACKAGES[0]
    cb = ClassAttribution(methods=("gradcam", "guided"), score=lambda out: out["logits"])
    trainer, _ = fit(pl, tmp_path, [cb], epochs=1, out="dict")
    assert "attribution/guided" in read_images(trainer.logger.log_dir).Tags()["images"]


def test_hooks_removed_after_an_exception(tmp_path):
    pl = PACKAGES[0]
    cb = ClassAttribution(methods=("gradcam", "guided"), every_n_steps=1)
    with pytest.raises(RuntimeError, match="planted failure"):
        fit(pl, tmp_path, [cb], epochs=1, fail_at_step=3)
    assert cb._last_step == 2  # it ran before the failure
    assert all(len(m._forward_hooks) == 0 for m in cb.__dict__.values() if isinstance(m, nn.Module))
    assert torch._C._len_torch_function_stack() == 0

    class Boom(ClassAttribution):  # a failure inside the attribution pass itself
        def _arguments(self, method, forward):
            args = super()._arguments(method, forward)
            if self._ready:
                args["forward"] = lambda x: (_ for _ in ()).throw(KeyError("inside"))
            return args

    pl.seed_everything(0, verbose=False)
    model = make_module(pl)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[Boom()],
                         logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="boom"), accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(KeyError, match="inside"):
        trainer.fit(model)
    assert no_hooks(model)


def test_csv_logger_only_warns_once(tmp_path):
    pl = PACKAGES[0]
    cb = ClassAttribution()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(pl, tmp_path, [cb], epochs=1, logger="csv")
    ours = [w for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(ours) == 1 and "ClassAttribution" in str(ours[0].message)
    assert cb._last_step == 3  # the schedule ran; nothing to draw on
