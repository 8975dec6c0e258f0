"""``suite()``: every lightning_vis callback in one line, at settings that keep each run within its per-run budget."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: Callbacks that are cheap enough to run at every default cadence.
CHEAP = ("FilterGrid", "DeadNeuronMonitor", "FeatureEvolution", "DeconvProjection", "ClassAttribution",
         "FeatureMaps", "TopActivations", "ClassUnitStatistics")  # fmt: skip
#: Callbacks whose runs cost more (optimisation loops, projector files): slower cadence.
EXPENSIVE = ("EmbeddingProjector", "ActivationMaximization", "FeatureInversion")

#: The settings ``suite()`` uses where they differ from a callback's own defaults.
SUITE_SETTINGS: dict[str, dict[str, Any]] = {
    "FilterGrid": {},
    "DeadNeuronMonitor": {},
    "FeatureEvolution": {},
    "DeconvProjection": {},
    "ClassAttribution": {"methods": ("gradcam",)},
    "FeatureMaps": {},
    "TopActivations": {},
    "ClassUnitStatistics": {},
    "EmbeddingProjector": {"every_n_epochs": 5},
    "ActivationMaximization": {"every_n_epochs": 5},
    "FeatureInversion": {"every_n_epochs": 5},
}


def _names(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in SUITE_SETTINGS]
    if unknown:
        valid = ", ".join(repr(n) for n in SUITE_SETTINGS)
        raise ValueError(f"Invalid value for {what}: unknown callback(s) {', '.join(map(repr, unknown))}. "
                         f"Must be among: {valid}")  # fmt: skip
    return names


def suite(
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = (),
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    expensive: bool = True,
) -> list:
    """One instance of every lightning_vis callback, at settings that keep each run within its per-run budget.

    The cheap callbacks run at their own defaults (the per-step monitor on sampled steps,
    the probe panels once per epoch); the expensive ones (the embedding projector,
    activation maximisation, feature inversion) every 5 epochs. Together they add ~7% to
    the demo's training on the CPU with 45-s epochs (``benchmarks/overhead.py --together
    suite``), more than DESIGN's 3% target; pass ``expensive=False`` or ``include`` the
    callbacks you need to pay less.

    Args:
        include: class names to keep (default: all of them).
        exclude: class names to leave out.
        options: per class name, keyword arguments that override the suite's settings,
            e.g. ``{"DeconvProjection": {"top_k": 4}, "ClassAttribution": {"methods": ["gradcam", "occlusion"]}}``.
        expensive: ``False`` leaves out the expensive callbacks.

    Raises:
        ValueError: an unknown class name (the valid ones are listed).

    Example::

        >>> from lightning_vis.callbacks import suite
        >>> [type(cb).__name__ for cb in suite(include=["FilterGrid", "DeadNeuronMonitor"])]
        ['FilterGrid', 'DeadNeuronMonitor']
        >>> len(suite(exclude="EmbeddingProjector", expensive=False))
        8
        >>> suite(exclude=["Saliency"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Invalid value for exclude: unknown callback(s) 'Saliency'. Must be among: 'FilterGrid', ...
    """
    from lightning_vis import callbacks

    chosen = _names(include, "include") or list(SUITE_SETTINGS)
    dropped = set(_names(exclude, "exclude") or ())
    options = dict(options or {})
    _names(list(options), "options")
    out = []
    for name in SUITE_SETTINGS:
        if name not in chosen or name in dropped or (not expensive and name in EXPENSIVE):
            continue
        kwargs = {**SUITE_SETTINGS[name], **dict(options.get(name, {}))}
        out.append(getattr(callbacks, name)(**kwargs))
    return out
