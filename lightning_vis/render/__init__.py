"""Rendering: tensors in, uint8 CHW images out (what TensorBoard's ``add_image`` takes).

Pure functions, no Lightning: grids come from :func:`torchvision.utils.make_grid`, text
from Pillow, colour maps from matplotlib. One submodule per kind of picture; everything
public is re-exported here, so ``from lightning_vis import render; render.filter_grid``.
"""

from lightning_vis.render._core import *  # noqa: F403
from lightning_vis.render._core import DEAD_RGB, UNIT_COLOURS, __all__ as _core_all  # noqa: F401
from lightning_vis.render._core import _as_rgb, _font, _resize  # noqa: F401  (shared by the submodules)
from lightning_vis.render.attribution import attribution_panel, heat_overlay
from lightning_vis.render.class_units import similarity_heatmap, units_markdown
from lightning_vis.render.embedding import neighbours_panel
from lightning_vis.render.synthesis import inversion_panel, labelled_grid, maximization_panel, to_display
from lightning_vis.render.units import feature_maps_panel, top_activations_grid

__all__ = [
    *_core_all,
    "DEAD_RGB",
    "UNIT_COLOURS",
    "attribution_panel",
    "feature_maps_panel",
    "heat_overlay",
    "inversion_panel",
    "labelled_grid",
    "maximization_panel",
    "neighbours_panel",
    "similarity_heatmap",
    "to_display",
    "top_activations_grid",
    "units_markdown",
]
