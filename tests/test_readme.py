"""Every Python snippet of the README runs, as a newcomer would paste it.

Snippets that use a ``model`` or ``images`` they do not define get a tiny LightningModule around
the demo CNN, of the Lightning package the snippet imports (32 generated images, so
``max_epochs=20`` takes seconds), and a few demo images; each
runs in a fresh namespace inside a temporary working directory (``runs/`` lands there).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets() -> list[tuple[int, str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        line = text[: match.start()].count("\n") + 1
        out.append((line, match.group(1)))
    return out


def test_the_readme_has_python_snippets():
    assert len(_snippets()) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("line, code", _snippets(), ids=[f"line{line}" for line, _ in _snippets()])
def test_readme_snippet_runs(tmp_path, monkeypatch, line, code):
    from lightning_vis.demo import DemoCNN, make_shapes
    from tests.helpers import make_module

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    package = "pytorch_lightning" if "pytorch_lightning" in code else "lightning.pytorch"
    model = make_module(DemoCNN(width=16), package, n=32, size=32, classes=10, batch_size=16)
    namespace = {"__name__": "__readme__", "model": model, "images": make_shapes(4, seed=1)[0]}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README is ours
