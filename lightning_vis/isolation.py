"""Run extra passes through a model without changing the experiment.

:func:`isolated` is the probe-isolation context every callback uses: inside it the model
is in eval mode, gradients are enabled (also inside ``torch.inference_mode``), autocast is
off; on exit, every module's ``training`` flag, every buffer, every parameter's ``.grad``
and ``requires_grad``, and the torch, CUDA, numpy and ``random`` RNG states are exactly
as they were, also when the body raises.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["isolated", "preserved_rng"]


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
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
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


@contextmanager
def isolated(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Probe isolation: whatever runs inside leaves ``model`` and the RNGs exactly as found.

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
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    with ExitStack() as stack:
        stack.enter_context(preserved_rng())
        try:
            if eval_mode:
                model.eval()
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield model
        finally:
            for m, flag in training:
                m.training = flag
            with torch.no_grad():
                for b, saved in buffers:
                    if b.shape != saved.shape or not torch.equal(b, saved):
                        b.copy_(saved)
            for p, grad, requires_grad in params:
                p.grad = grad
                p.requires_grad_(requires_grad)
