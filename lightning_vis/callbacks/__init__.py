"""Lightning callbacks that log what happens inside a CNN to TensorBoard."""

from lightning_vis.callbacks.dead import DeadNeuronMonitor
from lightning_vis.callbacks.deconv import DeconvProjection
from lightning_vis.callbacks.evolution import FeatureEvolution
from lightning_vis.callbacks.filters import FilterGrid

__all__ = ["FilterGrid", "DeconvProjection", "FeatureEvolution", "DeadNeuronMonitor"]
