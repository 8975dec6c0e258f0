"""Synthesis benchmarks: batched ``maximize`` vs one call per unit vs torch-lucent, a GPU proxy, per-run callback cost.

    python benchmarks/synthesis.py [--units 8] [--steps 32] [--repeats 5] [--threads N] [--clock wall|cpu]
                                   [--device cpu|cuda] [--skip-cost]

Prints Markdown tables:

1. **Speed.** ``maximize`` on U units of the demo CNN's last convolution: one batched
   call vs U single calls (same seeds, bit-identical images on the CPU) vs one
   ``torch-lucent`` ``render_vis`` per unit (its default transforms, Fourier +
   decorrelated parameterisation, the same number of steps, at the same canvas through
   its ``fixed_image_size``: by default it upsamples canvases under 224 px to 224 px,
   49× the pixels of a 32 px canvas). Medians (``--clock``: wall or process CPU time) of ``--repeats`` alternated
   repeats (batched, single, lucent, batched, …), lucent on its own copy of the model
   whose hooks are cleared before each repeat (lucent never removes them). torch-lucent runs where it imports
   (``pip install --no-deps torch-lucent kornia kornia_rs`` leaves torch alone).
2. **GPU proxy, counted on any device** (no GPU was at hand when this was written). On a
   GPU every kernel is a launch costing ~5–10 µs of host time, and every host read of a
   device tensor (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``) is a sync that
   drains the launch queue; for a model this small the launches, not the arithmetic, set
   the time. So this table counts, per call, with a ``TorchDispatchMode``: the aten ops
   dispatched; the kernel-launching ones among them (views, aliases and ``empty``
   allocations launch nothing and are left out); host reads of tensor values
   (``aten::_local_scalar_dense`` — what ``.item()``, ``bool()`` and ``float()`` run —
   plus calls of ``Tensor.tolist`` and ``.cpu``, which dispatch nothing on the
   CPU); and tensors built from host data (``torch.tensor(...)`` of Python or NumPy
   values, ``aten::lift_fresh``: an upload when moved to a GPU). Each is split into a part
   per optimisation step (the mean over steps 2 to ``--steps``: a call of ``--steps``
   steps minus a call of one step) and a fixed part per call. On the CPU the counter cannot tell where a tensor would live on a GPU: the
   fixed host reads of ``maximize`` are argument checks on CPU tensors before anything
   moves to the device, and ``torch.optim.Adam`` (lucent's optimiser) reads its step
   counter every step, a CPU tensor on a GPU too. ``--device cuda`` times the real thing.
3. **Per-run cost** of ``ActivationMaximization`` and ``FeatureInversion`` at their
   defaults, in demo training steps (batch 64, SGD) — DESIGN's budget is 10.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_vis.demo import DemoCNN, make_shapes
from lightning_vis.synthesis import invert, maximize

_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternated(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds of each function on ``clock``, the repeats interleaved (a, b, c, a, b, c, …)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _is_view(func: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class OpCounter(TorchDispatchMode):
    """Counts aten ops, kernel-launching ops, host reads of values and tensors built from host data."""

    _READERS = ("tolist", "cpu")  # `.numpy()` needs `.cpu()` first on a GPU: not counted twice

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.launches = self.reads = self.uploads = 0
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.ops += 1
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense":
                self.reads += 1
            elif name == "lift_fresh":
                self.uploads += 1
            elif not _is_view(func) and name not in _ALLOCATIONS:
                self.launches += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in self._READERS:  # dispatch nothing on the CPU: count the Python calls
            self._saved[name] = torch.Tensor.__dict__.get(name)
            original = getattr(torch.Tensor, name)

            def reader(t, *a, _original=original, **k):
                self.reads += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, name, reader)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, saved in self._saved.items():
                if saved is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, saved)

    def counts(self) -> tuple[int, int, int, int]:
        return self.ops, self.launches, self.reads, self.uploads


def count(fn: Callable[[], object]) -> tuple[int, int, int, int]:
    with OpCounter() as counter:
        fn()
    return counter.counts()


def lucent_runner(layer: str, units: list[int], size: int):
    """``(make(net, steps) -> run, why)``: U ``render_vis`` calls, or ``None`` with the reason when lucent does not import."""
    try:
        import kornia

        for fn in ("get_rotation_matrix2d", "warp_affine"):  # lucent 0.1.8 predates kornia 0.7's move
            if not hasattr(kornia, fn):
                setattr(kornia, fn, getattr(kornia.geometry.transform, fn))
        from lucent.optvis import objectives, param, render
    except Exception as err:  # noqa: BLE001 - report why
        return None, f"{type(err).__name__}: {err}"
    name = layer.replace(".", "_")

    def make(net: torch.nn.Module, steps: int) -> Callable[[], None]:
        model = copy.deepcopy(net)  # lucent leaves a hook on every module: its own copy, cleaned after each run

        def run() -> None:
            for m in model.modules():
                m._forward_hooks.clear()
            for u in units:
                render.render_vis(
                    model, objectives.channel(name, u), lambda: param.image(size, fft=True, decorrelate=True),
                    thresholds=(steps,), verbose=False, preprocess=False, progress=False, show_image=False,
                    fixed_image_size=size,
                )  # fmt: skip

        return run

    return make, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (steadier on a shared machine; "
                             "counts OpenMP threads' spinning too; meaningless for GPU time)")  # fmt: skip
    parser.add_argument("--skip-cost", action="store_true", help="leave out the per-run callback cost table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = DemoCNN().to(device).eval()
    layer, size = "features.12", 32
    units = list(range(args.units))
    kw = {"size": size, "mean": 0.5, "std": 0.25}

    def batched(steps: int = args.steps) -> Callable[[], object]:
        return lambda: maximize(net, layer, units, steps=steps, **kw)

    def single(steps: int = args.steps) -> Callable[[], object]:
        return lambda: [maximize(net, layer, [u], steps=steps, **kw) for u in units]

    make_lucent, why = lucent_runner(layer, units, size)
    a = batched()().images
    b = torch.cat([r.images for r in single()()])
    same = float((a - b).abs().max())
    fns = {"batched": batched(), "single": single()}
    if make_lucent:
        fns["lucent"] = make_lucent(net, args.steps)
        fns["lucent"]()  # warm-up (kornia's first calls)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    t = alternated(fns, args.repeats, device, clock)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n### `maximize`: {args.units} units of the demo CNN's `{layer}`, {args.steps} steps, {size} px, {name}\n")
    print(f"{args.clock} clock, median of {args.repeats} alternated repeats.\n")
    print("| method | time (s) | vs batched |")
    print("|---|---:|---:|")
    print(f"| `maximize`, all units in one batch | {t['batched']:.3f} | 1.0× |")
    print(f"| `maximize`, one call per unit | {t['single']:.3f} | {t['single'] / t['batched']:.2f}× slower |")
    if "lucent" in t:
        print(f"| torch-lucent `render_vis`, one per unit (same canvas) | {t['lucent']:.3f} | {t['lucent'] / t['batched']:.2f}× slower |")
    else:
        print(f"| torch-lucent | — | does not import: {why} |")
    print(f"\nBatched vs single calls, largest pixel difference: {same:.1e} (same seeds → same images).")

    # ------------------------------------------------------------ GPU proxy: launches and host reads
    rows = [("`maximize`, all units in one batch", batched), ("`maximize`, one call per unit", single)]
    if make_lucent:
        rows.append(("torch-lucent `render_vis`, one per unit", lambda steps: make_lucent(net, steps)))
    print(f"\n### GPU proxy: what {args.units} units × {args.steps} steps dispatch ({name})\n")
    print("Per call (U units), counted with a `TorchDispatchMode`; *per step*: the mean over steps 2 to "
          f"{args.steps} (a call of {args.steps} steps minus a call of 1), *fixed*: the rest. On a GPU each kernel "
          "launch costs ~5–10 µs of host time and each host read of a device tensor is a sync.\n")  # fmt: skip
    print("| call | aten ops | kernel launches | per step | fixed | host reads | per step | fixed | host → tensor | per step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, make in rows:
        full, one = count(make(args.steps)), count(make(1))
        per_step = [(f - o) / max(1, args.steps - 1) for f, o in zip(full, one)]
        fixed = [f - s * args.steps for f, s in zip(full, per_step)]
        print(
            f"| {label} | {full[0]} | {full[1]} | {per_step[1]:.1f} | {fixed[1]:.0f} | {full[2]} | {per_step[2]:.1f} | "
            f"{fixed[2]:.0f} | {full[3]} | {per_step[3]:.1f} |"
        )

    if args.skip_cost:
        return
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
    lo, hi = x.amin(dim=(0, 2, 3)).cpu(), x.amax(dim=(0, 2, 3)).cpu()
    # what the callbacks call at their defaults (see lightning_vis/callbacks/synthesis.py)
    am = lambda: maximize(net, "features.12", list(range(6)), size=32, steps=32, lr=0.1,  # noqa: E731
                          redirect_steps=8, value_range=(lo, hi))  # fmt: skip
    inv = lambda: [invert(net, x[:4], layer, steps=64, lr=0.1, lambda_tv=3e-4, lambda_tv_start=0.1,  # noqa: E731
                          value_range=(lo, hi)) for layer in ("features.0", "features.8")]  # fmt: skip
    t = alternated({"steps": lambda: [step() for _ in range(5)], "am": am, "inv": inv}, args.repeats, device, clock)
    t_step = t["steps"] / 5
    print(f"\n### Per-run cost at the defaults (demo CNN, {name}); budget: 10 training steps\n")
    print("| callback run | time (s) | demo training steps (batch 64) |")
    print("|---|---:|---:|")
    print(f"| one training step | {t_step:.3f} | 1 |")
    print(f"| `ActivationMaximization` (1 layer, 6 units, 32 steps, 32 px) | {t['am']:.2f} | {t['am'] / t_step:.1f} |")
    print(f"| `FeatureInversion` (2 layers, 4 images, 64 steps) | {t['inv']:.2f} | {t['inv'] / t_step:.1f} |")


if __name__ == "__main__":
    main()
