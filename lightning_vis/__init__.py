"""lightning_vis: see inside a CNN while it trains.

Pure functions (``project``, rendering, statistics) need only torch; the Lightning
callbacks live in :mod:`lightning_vis.callbacks`.
"""

from lightning_vis.deconv import project

__version__ = "0.1.0"

__all__ = ["__version__", "project"]
