"""Run extra passes through a model without changing the experiment.

:func:`isolated` is the probe-isolation context every callback uses: inside it the model
is in eval mode, gradients are enabled (also inside ``torch.inference_mode``), autocast is
off and float32 math is full fp32 (TF32 off for cuBLAS matmuls and cuDNN convolutions,
float32 matmul precision ``"highest"``: :func:`full_fp32`), so a probe on a GPU gives the
same units and values as on the CPU; on exit, every module's ``training`` flag, every
buffer, every parameter's ``.grad`` and ``requires_grad``, the torch, CUDA, numpy and
``random`` RNG states and those settings are exactly as they were, also when the body
raises.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["full_fp32", "isolated", "preserved_rng"]

# op-level float32 precision settings of torch >= 2.9 (absent before: the legacy flags suffice)
_FP32_OPS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), numpy and ``random`` RNG states on exit.

    Example::

        >>> state = torch.get_rng_state()
        >>> with preserved_rng():
        ...     _ = torch.rand(3)
        >>> torch.equal(torch.get_rng_state(), state)
        True
    """
    cpu = torch.get_rng_state()
    # is_initialized, not is_available: the latter asks NVML on every call (~0.2 ms on a CUDA
    # build without a GPU), and an uninitialised CUDA has no generator state anyone used
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


@functools.cache
def _fp32_settings() -> list:
    found = []
    for path in _FP32_OPS:
        obj = torch.backends
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


@contextmanager
def full_fp32() -> Iterator[None]:
    """Full fp32 inside: no TF32 (cuBLAS, cuDNN) and no reduced-precision float32 matmuls.

    PyTorch lets cuDNN convolutions use TF32 by default, and ``float32_matmul_precision``
    ``"high"``/``"medium"`` lets matmuls use TF32 or bf16 (also on the CPU, through
    oneDNN): a projection computed so differs from the CPU's by up to ~20% of its maximum.
    Inside, ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    are False, ``torch.get_float32_matmul_precision()`` is ``"highest"``, and the
    op-level ``fp32_precision`` settings of newer PyTorch are ``"ieee"``. Every setting is
    restored on exit, also when the body raises. Works without a GPU (the flags are global).

    Example::

        >>> before = torch.get_float32_matmul_precision()
        >>> with full_fp32():
        ...     torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
        (False, 'highest')
        >>> torch.get_float32_matmul_precision() == before
        True
    """
    settings = _fp32_settings()
    saved = [s.fp32_precision for s in settings]
    precision = torch.get_float32_matmul_precision()
    try:
        cudnn = torch.backends.cudnn.allow_tf32
    except RuntimeError:  # legacy and op-level settings were mixed: the op-level ones are restored below
        cudnn = None
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        for s in settings:
            s.fp32_precision = "ieee"
        yield
    finally:
        torch.set_float32_matmul_precision(precision)  # also restores cuda.matmul.allow_tf32
        if cudnn is not None:
            torch.backends.cudnn.allow_tf32 = cudnn
        for s, value in zip(settings, saved):
            s.fp32_precision = value


class _BufferSnapshot:
    """A copy of many buffers in one tensor per (device, dtype), restored where changed.

    One ``torch.cat`` per group saves them; on exit one more per group and a bytewise
    comparison of all groups of a device, read back with a single host sync, check them
    (a clone and a ``torch.equal`` per buffer would cost a kernel and a sync each on a GPU:
    a resnet50 has 159 buffers). Comparing bytes, not values, also sees a change made
    through ``.data`` (which bypasses version counters), NaNs and signed zeros; nothing is
    written back to a buffer that is unchanged.
    """

    def __init__(self, buffers) -> None:
        groups: dict = {}
        for b in buffers:
            groups.setdefault((b.device, b.dtype), []).append(b)
        self.groups = [(bs, self._layout(bs), self._flat(bs)) for bs in groups.values()]

    @staticmethod
    def _layout(bs: list) -> list:
        return [(b.shape, b.dtype, b.device) for b in bs]

    @staticmethod
    def _flat(bs: list) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([b.reshape(-1) for b in bs])

    def restore(self) -> None:
        with torch.no_grad():
            suspects, checks = [], {}
            for group in self.groups:
                bs, layout, saved = group
                if self._layout(bs) != layout:
                    suspects.append(group)
                elif saved.device.type == "cpu":  # no sync to save: one op
                    if not torch.equal(self._flat(bs).view(torch.uint8), saved.view(torch.uint8)):
                        suspects.append(group)
                else:
                    differs = self._flat(bs).view(torch.uint8).ne(saved.view(torch.uint8)).any()
                    checks.setdefault(saved.device, []).append((group, differs))
            for items in checks.values():
                flags = torch.stack([d for _, d in items])
                if bool(flags.any()):  # the one host sync per device
                    suspects += [group for (group, _), changed in zip(items, flags.tolist()) if changed]
            for bs, layout, saved in suspects:
                offset = 0
                for b, (shape, dtype, device) in zip(bs, layout):
                    part = saved[offset : offset + shape.numel()].view(shape)
                    offset += shape.numel()
                    if b.dtype != dtype or b.device != device:
                        b.data = part.clone()  # converted inside: put the original tensor kind back
                        continue
                    if b.shape != shape:
                        b.resize_(shape)
                    if not torch.equal(b.reshape(-1).view(torch.uint8), part.reshape(-1).view(torch.uint8)):
                        b.copy_(part)


@contextmanager
def isolated(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Probe isolation: whatever runs inside leaves ``model`` and the RNGs exactly as found.

    Inside: eval mode (unless ``eval_mode=False``), gradients enabled even under
    ``torch.inference_mode``, autocast off (CPU and CUDA) and full fp32 (:func:`full_fp32`:
    TF32 off for cuDNN and cuBLAS, float32 matmul precision ``"highest"``), so probe
    computations on a GPU match the CPU's. Restored on exit, also on errors: every
    module's ``training`` flag, buffers, parameters' ``.grad`` and ``requires_grad``, the
    RNG states, the autocast state and the TF32 / matmul-precision settings.

    Args:
        model: the module to protect.
        eval_mode: switch every module to eval mode inside (default).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
        >>> before = net[1].running_mean.clone()
        >>> with isolated(net):
        ...     net.training, net(torch.randn(2, 3, 8, 8)).requires_grad
        (False, True)
        >>> net.training, torch.equal(net[1].running_mean, before)
        (True, True)
    """
    training = [(m, m.training) for m in model.modules()]
    buffers = _BufferSnapshot(model.buffers())
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    with ExitStack() as stack:
        stack.enter_context(preserved_rng())
        try:
            if eval_mode and any(flag for _, flag in training):  # (validation hooks: already all eval)
                model.eval()
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_initialized():  # a model on a GPU has initialised CUDA
                stack.enter_context(torch.autocast("cuda", enabled=False))
            stack.enter_context(full_fp32())
            yield model
        finally:
            for m, flag in training:
                if m.training is not flag:
                    m.training = flag
            buffers.restore()
            for p, grad, requires_grad in params:  # only what changed: the setters are not free
                if p.grad is not grad:
                    p.grad = grad
                if p.requires_grad is not requires_grad:
                    p.requires_grad_(requires_grad)
