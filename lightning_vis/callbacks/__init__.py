"""Lightning callbacks that log what happens inside a CNN to TensorBoard.

``suite()`` returns all of them at settings that keep each run within its per-run budget.
"""

from lightning_vis.callbacks.attribution import ClassAttribution
from lightning_vis.callbacks.class_units import ClassUnitStatistics
from lightning_vis.callbacks.dead import DeadNeuronMonitor
from lightning_vis.callbacks.deconv import DeconvProjection
from lightning_vis.callbacks.embedding import EmbeddingProjector
from lightning_vis.callbacks.evolution import FeatureEvolution
from lightning_vis.callbacks.feature_maps import FeatureMaps
from lightning_vis.callbacks.filters import FilterGrid
from lightning_vis.callbacks.suite import suite
from lightning_vis.callbacks.synthesis import ActivationMaximization, FeatureInversion
from lightning_vis.callbacks.top_activations import TopActivations

__all__ = [
    "suite",
    "FilterGrid",
    "DeconvProjection",
    "DeadNeuronMonitor",
    "FeatureEvolution",
    "ClassAttribution",
    "FeatureMaps",
    "TopActivations",
    "ClassUnitStatistics",
    "EmbeddingProjector",
    "ActivationMaximization",
    "FeatureInversion",
]
