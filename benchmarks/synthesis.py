"""Synthesis benchmarks: batched ``maximize`` vs one call per unit vs torch-lucent, and per-run callback cost.

    python benchmarks/synthesis.py [--units 8] [--steps 32] [--repeats 3] [--device cpu]

Prints Markdown tables (medians of ``--repeats``):

1. ``maximize`` on U units of the demo CNN's last convolution: one batched call vs U
   single calls (same seeds, same images), and vs one ``torch-lucent`` ``render_vis``
   per unit (its default transforms, Fourier + decorrelated parameterisation, the same
   number of steps and canvas) when ``torch-lucent`` imports (``pip install --no-deps
   torch-lucent kornia kornia_rs`` leaves torch alone).
2. The per-run cost of ``ActivationMaximization`` and ``FeatureInversion`` at their
   defaults, in demo training steps (batch 64, SGD) — DESIGN's budget is 10.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_vis.demo import DemoCNN, make_shapes
from lightning_vis.synthesis import invert, maximize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lucent_runner(net, layer: str, units: list[int], steps: int, size: int):
    """One ``render_vis`` per unit, or ``None`` with the reason when torch-lucent does not import."""
    try:
        import kornia

        for fn in ("get_rotation_matrix2d", "warp_affine"):  # lucent 0.1.8 predates kornia 0.7's move
            if not hasattr(kornia, fn):
                setattr(kornia, fn, getattr(kornia.geometry.transform, fn))
        from lucent.optvis import objectives, param, render
    except Exception as err:  # noqa: BLE001 - report why
        return None, f"{type(err).__name__}: {err}"
    name = layer.replace(".", "_")

    def run():
        for u in units:
            render.render_vis(
                net, objectives.channel(name, u), lambda: param.image(size, fft=True, decorrelate=True),
                thresholds=(steps,), verbose=False, preprocess=False, progress=False, show_image=False,
            )  # fmt: skip

    return run, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = DemoCNN().to(device).eval()
    layer, size = "features.12", 32
    units = list(range(args.units))
    kw = dict(size=size, steps=args.steps, mean=0.5, std=0.25)

    batched = lambda: maximize(net, layer, units, **kw)  # noqa: E731
    single = lambda: [maximize(net, layer, [u], **kw) for u in units]  # noqa: E731
    batched()  # warm-up
    a = maximize(net, layer, units, **kw).images
    b = torch.cat([r.images for r in single()])
    same = float((a - b).abs().max())
    t_batched = timed(batched, args.repeats, device)
    t_single = timed(single, args.repeats, device)
    lucent, why = lucent_runner(net, layer, units, args.steps, size)
    t_lucent = timed(lucent, args.repeats, device) if lucent else None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n### `maximize`: {args.units} units of the demo CNN's `{layer}`, {args.steps} steps, {size} px, {name}\n")
    print("| method | time (s) | vs batched |")
    print("|---|---:|---:|")
    print(f"| `maximize`, all units in one batch | {t_batched:.2f} | 1.0× |")
    print(f"| `maximize`, one call per unit | {t_single:.2f} | {t_single / t_batched:.1f}× slower |")
    if t_lucent is not None:
        print(f"| torch-lucent `render_vis`, one per unit | {t_lucent:.2f} | {t_lucent / t_batched:.1f}× slower |")
    else:
        print(f"| torch-lucent | — | does not import: {why} |")
    print(f"\nBatched vs single calls, largest pixel difference: {same:.1e} (same seeds → same images).")

    # ------------------------------------------------------------ per-run cost of the callbacks
    x, y = make_shapes(64, seed=1)
    x, y = x.to(device), y.to(device)
    train_net = DemoCNN().to(device)
    opt = torch.optim.SGD(train_net.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(train_net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t_step = timed(lambda: [step() for _ in range(5)], args.repeats, device) / 5
    lo, hi = x.amin(dim=(0, 2, 3)).cpu(), x.amax(dim=(0, 2, 3)).cpu()
    am = lambda: maximize(net, "features.12", list(range(6)), size=32, steps=32, lr=0.1,  # noqa: E731
                          redirect_steps=8, value_range=(lo, hi))  # fmt: skip
    inv = lambda: [invert(net, x[:4], layer, steps=64, lr=0.1, value_range=(lo, hi))  # noqa: E731
                   for layer in ("features.0", "features.8")]  # fmt: skip
    t_am, t_inv = timed(am, args.repeats, device), timed(inv, args.repeats, device)
    print(f"\n### Per-run cost at the defaults (demo CNN, {name}); budget: 10 training steps\n")
    print("| callback run | time (s) | demo training steps (batch 64) |")
    print("|---|---:|---:|")
    print(f"| one training step | {t_step:.3f} | 1 |")
    print(f"| `ActivationMaximization` (1 layer, 6 units, 32 steps, 32 px) | {t_am:.2f} | {t_am / t_step:.1f} |")
    print(f"| `FeatureInversion` (2 layers, 4 images, 64 steps) | {t_inv:.2f} | {t_inv / t_step:.1f} |")


if __name__ == "__main__":
    main()
