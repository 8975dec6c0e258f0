"""Lightning callbacks that log what happens inside a CNN to TensorBoard."""

from lightning_vis.callbacks.filters import FilterGrid

__all__ = ["FilterGrid"]
