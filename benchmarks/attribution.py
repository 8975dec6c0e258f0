"""Benchmark: ``lightning_vis.attribute`` against pytorch-grad-cam and Captum's default calls.

The demo CNN (``lightning_vis.demo.model.DemoCNN``, eval mode, random weights) on a batch
of random 32×32 images, the maps of each image's predicted class:

* Grad-CAM at ``features`` (the default layer; given, as to the others, and found):
  ``attribute(method="gradcam")`` vs
  pytorch-grad-cam ``GradCAM`` (compared after its per-image min-max normalisation) and
  Captum ``LayerGradCam(relu_attributions=True)`` + ``LayerAttribution.interpolate``.
* Score-CAM at ``features``: ``attribute(method="scorecam")`` (masked forwards of all
  images × channels in chunks) vs pytorch-grad-cam ``ScoreCAM`` (a loop over images,
  16 masks per forward, ``.item()`` per score). pytorch-grad-cam upsamples its masks with
  ``align_corners=True``; for the comparison of maps its upsampler is switched to
  ``align_corners=False`` (our convention) — the timing is unaffected.
* Occlusion, 8×8 windows, stride 4: ``attribute(method="occlusion")`` (all windows of all
  images in chunks under ``no_grad``) vs Captum ``Occlusion`` with its default
  ``perturbations_per_eval=1``.

Also the per-run cost of ``ClassAttribution`` (attribution + rendering + PNG encoding of
8 probe images) against one training step of ``DemoModule`` (batch 64, forward, backward,
SGD step), for the default ``methods=("gradcam",)`` and for the demo's
``("gradcam", "occlusion")``.

Times are medians of alternated repeats, in one run. A second table counts, per call,
the device operations (aten ops that launch a kernel on a GPU: views and allocations
excluded) and the host syncs (ops whose result the host must wait for: ``.item()``,
``bool()``, ``torch.equal``, ``nonzero``); it is the proxy for a GPU, where every op is a
kernel launch of ~5–10 µs and every sync drains the queue, until the same script runs on
one (``--device cuda``). The one device→host copy of the finished maps that every
implementation makes is not counted.

Run: ``python benchmarks/attribution.py [--images 16] [--repeats 7] [--threads N] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM prints progress bars

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lightning_vis import attribute, render  # noqa: E402
from lightning_vis.attribution import _chunk_rows  # noqa: E402
from lightning_vis.demo.model import DemoCNN  # noqa: E402

PATCH, STRIDE = 8, 4


_CLOCK = time.perf_counter
_DEVICE = torch.device("cpu")
_SYNCS = {"_local_scalar_dense", "equal", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias",
              "_to_copy_meta"}  # fmt: skip


def _sync() -> None:
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    start = _CLOCK()
    fn()
    _sync()
    return _CLOCK() - start


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that would launch a kernel on a GPU, and the host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCS:
            self.syncs += 1
            self.ops += name != "_local_scalar_dense"
        elif not func.is_view and name not in _NO_KERNEL:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> tuple[int, int]:
    with _OpCounter() as counter:
        fn()
    return counter.ops, counter.syncs


def _minmax(m: torch.Tensor) -> torch.Tensor:
    m = m - m.amin((1, 2), keepdim=True)
    return m / (m.amax((1, 2), keepdim=True) + 1e-7)


@contextlib.contextmanager
def _align_corners_false():
    """pytorch-grad-cam's ``nn.UpsamplingBilinear2d`` (align_corners=True) → align_corners=False."""
    original = torch.nn.UpsamplingBilinear2d

    class Upsample(torch.nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x):
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    torch.nn.UpsamplingBilinear2d = Upsample
    try:
        yield
    finally:
        torch.nn.UpsamplingBilinear2d = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (counts OpenMP threads' spinning too)")
    args = parser.parse_args()
    global _CLOCK, _DEVICE
    _CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    _DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from captum.attr import LayerAttribution, LayerGradCam, Occlusion
    from pytorch_grad_cam import GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = DemoCNN().eval().to(_DEVICE)
    # pytorch-grad-cam writes .grad into the parameters: it gets a copy; Captum (autograd.grad,
    # no writes) runs on the same model object as ours, so both read the same weights' memory
    oracle_model = copy.deepcopy(model)
    layer = oracle_model.features
    x = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(_DEVICE)
    with torch.no_grad():
        pred = model(x).argmax(1)
    pgc_targets = [ClassifierOutputTarget(int(t)) for t in pred]

    def ours(method, **kw):
        return attribute(model, x, targets=pred, method=method, **kw).maps

    def pgc(cls):
        with cls(model=oracle_model, target_layers=[layer]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=pgc_targets)).to(_DEVICE)

    def captum_gradcam():
        attr = LayerGradCam(model, model.features).attribute(x, target=pred, relu_attributions=True)
        return LayerAttribution.interpolate(attr, (32, 32), "bilinear")[:, 0]

    def captum_occlusion():
        return Occlusion(model).attribute(
            x, target=pred, sliding_window_shapes=(3, PATCH, PATCH), strides=(3, STRIDE, STRIDE), baselines=0.0
        )[:, 0]

    rows = [
        ("Grad-CAM", "pytorch-grad-cam `GradCAM`", lambda: ours("gradcam", layer="features"), lambda: pgc(GradCAM),
         True),
        ("Grad-CAM", "Captum `LayerGradCam` + interpolate", lambda: ours("gradcam", layer="features"),
         captum_gradcam, False),
        ("Grad-CAM (default layer, found in the same pass)", "Captum `LayerGradCam` + interpolate",
         lambda: ours("gradcam"), captum_gradcam, False),
        ("Score-CAM", "pytorch-grad-cam `ScoreCAM`", lambda: ours("scorecam", layer="features"),
         lambda: pgc(ScoreCAM), True),
        ("occlusion", "Captum `Occlusion` (default call)", lambda: ours("occlusion", patch=PATCH, stride=STRIDE),
         captum_occlusion, False),
    ]  # fmt: skip
    # the op counts stand in for a GPU: count the chunking attribute() chooses there
    gpu_chunk = _chunk_rows(None, x[0].numel(), torch.device("cuda"))
    gpu_rows = rows[:3] + [
        rows[3][:2] + (lambda: ours("scorecam", layer="features", batch_size=gpu_chunk),) + rows[3][3:],
        rows[4][:2] + (lambda: ours("occlusion", patch=PATCH, stride=STRIDE, batch_size=gpu_chunk),) + rows[4][3:],
    ]
    errors = []
    with _align_corners_false():
        for name, other, mine, theirs, normalise in rows:
            a, b = mine(), theirs()
            if normalise:
                a = _minmax(a)
            errors.append(float((a - b).abs().max()))
        counts = [(_count(mine), _count(theirs)) for _, _, mine, theirs, _ in gpu_rows]

        times = {i: ([], []) for i in range(len(rows))}
        # calls per measurement: >= 0.2 s each, so that fast methods are not timer noise
        inner = [max(1, math.ceil(0.2 / max(_timed(mine), 1e-6))) for _, _, mine, _, _ in rows]
        # row by row (a heavy row's chunks must not disturb a light row's caches), ours and
        # theirs alternated within the row, so that drifts in machine load hit both alike
        for i, (_, _, mine, theirs, _) in enumerate(rows):
            for r in range(args.repeats):
                pair = [(0, mine), (1, theirs)] if r % 2 == 0 else [(1, theirs), (0, mine)]
                for side, fn in pair:
                    times[i][side].append(_timed(lambda fn=fn, k=inner[i]: [fn() for _ in range(k)]) / inner[i])

    step_ms, runs = _callback_cost(args.repeats)

    where = torch.cuda.get_device_name(_DEVICE) if _DEVICE.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"DemoCNN (random weights, eval), {args.images} images 32x32, predicted classes; torch {torch.__version__}, "
        f"{where}, {args.clock} clock, median of {args.repeats} alternated repeats\n"
    )
    print("| method | baseline | ours (ms) | baseline (ms) | speed-up | max abs. difference of the maps |")
    print("|---|---|---:|---:|---:|---:|")
    for i, (name, other, *_rest) in enumerate(rows):
        mine, theirs = (statistics.median(t) for t in times[i])
        print(f"| {name} | {other} | {mine * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / mine:.2f}x | {errors[i]:.1e} |")
    print(f"\nGPU proxy, counted on this run (ours chunked as on a GPU: {gpu_chunk} masked images per forward)\n")
    print("| method | baseline | device ops, ours | device ops, baseline | fewer | host syncs, ours | host syncs, baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, other, *_rest), ((o_ops, o_sync), (t_ops, t_sync)) in zip(rows, counts):
        print(f"| {name} | {other} | {o_ops} | {t_ops} | {t_ops / o_ops:.1f}x | {o_sync} | {t_sync} |")
    print("\n| ClassAttribution run (8 probe images, render + PNG) | time (ms) | training steps (batch 64) |")
    print("|---|---:|---:|")
    for methods, t in runs.items():
        print(f"| methods={methods} | {t * 1e3:.1f} | {t / step_ms * 1e3:.2f} |")
    print(f"\none DemoModule training step: {step_ms:.1f} ms; budget: a periodic run <= 10 training steps")


def _callback_cost(repeats: int) -> tuple[float, dict]:
    """Median ms of one DemoModule training step, and seconds of one ClassAttribution run per configuration."""
    from lightning_vis.callbacks._base import _image_summary
    from lightning_vis.demo.data import ShapesDataset

    torch.manual_seed(0)
    net = DemoCNN().to(_DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = ShapesDataset(64 + 8, size=32, seed=0)
    batch = torch.stack([data[i][0] for i in range(64)]).to(_DEVICE)
    labels = torch.tensor([int(data[i][1]) for i in range(64)]).to(_DEVICE)
    probe = torch.stack([data[64 + i][0] for i in range(8)]).to(_DEVICE)

    def step():
        net.train()
        loss = F.cross_entropy(net(batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(methods):
        for method in methods:
            result = attribute(net, probe, method=method)
            captions = [[f"pred {int(t)} 90%", "true 0"] for t in result.targets]
            panel = render.attribution_panel(probe, result.maps, captions, cell_px=96)
            _image_summary(f"attribution/{method}", panel, "")

    configs = {("gradcam",): [], ("gradcam", "occlusion"): []}
    steps = []
    step()
    for methods in configs:
        run(methods)
    for _ in range(repeats):
        steps.append(_timed(step))
        for methods, ts in configs.items():
            ts.append(_timed(lambda: run(methods)))
    return statistics.median(steps) * 1e3, {m: statistics.median(t) for m, t in configs.items()}


if __name__ == "__main__":
    main()
