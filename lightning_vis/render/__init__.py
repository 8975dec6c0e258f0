"""Rendering: tensors in, uint8 CHW images out (what TensorBoard's ``add_image`` takes).

Pure functions, no Lightning: grids come from :func:`torchvision.utils.make_grid`, text
from Pillow, colour maps from matplotlib. One submodule per kind of picture; everything
public is re-exported here, so ``from lightning_vis import render; render.filter_grid``.
"""

from lightning_vis.render._core import *  # noqa: F403
from lightning_vis.render._core import DEAD_RGB, UNIT_COLOURS, __all__ as _core_all  # noqa: F401
from lightning_vis.render._core import _font, _as_rgb, _resize  # noqa: F401  (shared by the submodules)

__all__ = [*_core_all, "DEAD_RGB", "UNIT_COLOURS"]
