"""lightning_vis: see inside a CNN while it trains.

The pure functions need only torch: ``project`` sends a unit back to pixels, ``attribute``
a class score; ``receptive_field`` and ``top_activations`` find what drives each unit
across a dataset; ``maximize`` and ``invert`` synthesise images. The Lightning callbacks
live in :mod:`lightning_vis.callbacks`.
"""

from lightning_vis.attribution import Attribution, attribute
from lightning_vis.deconv import Projection, project
from lightning_vis.synthesis import Inversion, Maximization, invert, maximize
from lightning_vis.units import receptive_field, top_activations

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "Attribution",
    "Inversion",
    "Maximization",
    "Projection",
    "attribute",
    "invert",
    "maximize",
    "project",
    "receptive_field",
    "top_activations",
]
