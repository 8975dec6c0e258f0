"""Benchmark: ``lightning_vis.project`` against Captum's ``NeuronDeconvolution`` per unit.

torchvision ``vgg11(weights=None)`` in eval mode, 4 random 64×64 images, the top 8 units
of ``features.8``: the same 32 projections by one ``project()`` call and by 32 Captum
calls (one per image and unit, on a copy of the model with ``inplace=False`` ReLUs, which
Captum's backward hooks need). Checks that they agree (max relative difference ≤ 1e-4
after dividing out the seeds), and times both as medians of alternated repeats. Also
reports ``project()``'s time relative to one forward + backward of the same batch through
the whole model (gradients with respect to the input and the parameters).

Run: ``python benchmarks/deconv.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_vis import project

LAYER = "features.8"


def _captum_projections(model: nn.Module, x: torch.Tensor, p) -> torch.Tensor:
    from captum.attr import NeuronDeconvolution

    layer = dict(model.named_modules())[LAYER]
    oracle = NeuronDeconvolution(model, layer)
    n, k = p.channels.shape
    out = torch.empty_like(p.images)
    for i in range(n):
        for j in range(k):
            c, (r, col) = int(p.channels[i, j]), p.locations[i, j].tolist()
            out[i, j] = oracle.attribute(x[i : i + 1], neuron_selector=(c, r, col))[0]
    return out


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    xx = x.clone().requires_grad_(True)
    model(xx).sum().backward()
    model.zero_grad(set_to_none=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    import torchvision

    warnings.filterwarnings("ignore", module="captum")
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None).eval()
    captum_model = copy.deepcopy(model)
    for m in captum_model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    p = project(model, x, LAYER, top_k=args.top_k)  # warm-up, and the units Captum recomputes
    ref = _captum_projections(captum_model, x, p)
    seeds = p.activations[:, :, None, None, None]
    err = float(((p.images / seeds - ref).abs().amax(dim=(2, 3, 4)) / ref.abs().amax(dim=(2, 3, 4))).max())
    _forward_backward(model, x)

    t_project, t_captum, t_fb = [], [], []
    for _ in range(args.repeats):  # alternated, so drifts in machine load hit all three alike
        t_project.append(_timed(lambda: project(model, x, LAYER, top_k=args.top_k)))
        t_captum.append(_timed(lambda: _captum_projections(captum_model, x, p)))
        t_fb.append(_timed(lambda: _forward_backward(model, x)))
    mp, mc, mf = (statistics.median(t) for t in (t_project, t_captum, t_fb))
    n_units = args.images * args.top_k
    print(
        f"vgg11 (weights=None, eval), {args.images} images {args.size}x{args.size}, top {args.top_k} units "
        f"of {LAYER} = {n_units} projections; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} alternated repeats\n"
    )
    print("| what | time (ms) | ratio |")
    print("|---|---:|---:|")
    print(f"| `project()` (1 forward to the layer + 1 batched backward) | {mp * 1e3:.1f} | 1.0 |")
    print(f"| Captum `NeuronDeconvolution`, {n_units} calls | {mc * 1e3:.1f} | {mc / mp:.1f}x slower |")
    print(f"| one forward+backward of the batch, whole model | {mf * 1e3:.1f} | project = {mp / mf:.2f}x this |")
    print(f"\nmax relative difference project vs Captum (seeds divided out): {err:.2e} (limit 1e-4)")
    print(f"speed-up over Captum: {mc / mp:.1f}x (target >= 5x)")
    if err > 1e-4:
        raise SystemExit(f"results differ: max relative difference {err:.2e} > 1e-4")


if __name__ == "__main__":
    main()
