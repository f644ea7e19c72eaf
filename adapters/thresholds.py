"""Confidence thresholds: the stock block's modes plus an optional per-class mapping."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from inference_models.configuration import INFERENCE_MODELS_RFDETR_DEFAULT_CONFIDENCE
from inference_models.models.common.roboflow.post_processing import ConfidenceFilter


def resolve_threshold(
    confidence_mode: str,
    custom_confidence: Optional[float],
    per_class_confidence: Optional[Mapping[str, float]],
    class_names: Sequence[str],
    recommended_parameters=None,
) -> Union[float, torch.Tensor]:
    """A scalar threshold, or a per-class tensor indexed by class id when any class differs.

    `best`/`default`/`custom` behave exactly as in the stock block (inference-models'
    ``ConfidenceFilter``); `per_class_confidence` then overrides the listed classes.
    """
    if confidence_mode not in ("best", "default", "custom"):
        raise ValueError(f"`confidence_mode` must be one of best|default|custom, got {confidence_mode!r}.")
    if confidence_mode == "custom" and custom_confidence is None:
        raise ValueError("`custom_confidence` is required when `confidence_mode` is 'custom'.")
    confidence = _unit_interval("custom_confidence", custom_confidence) if confidence_mode == "custom" else confidence_mode
    base = ConfidenceFilter(
        confidence=confidence,
        recommended_parameters=recommended_parameters,
        default_confidence=INFERENCE_MODELS_RFDETR_DEFAULT_CONFIDENCE,
    ).get_threshold(list(class_names))
    if not per_class_confidence:
        return base
    if not isinstance(per_class_confidence, Mapping):
        raise ValueError(
            f"`per_class_confidence` must map class names to thresholds, got {type(per_class_confidence).__name__}."
        )
    per_class_confidence = {
        name: _unit_interval(f"per_class_confidence[{name!r}]", value) for name, value in per_class_confidence.items()
    }
    unknown = sorted(set(per_class_confidence) - set(class_names))
    if unknown:
        raise ValueError(
            f"`per_class_confidence` names classes the model does not have: {unknown}. "
            f"Model classes: {list(class_names)}."
        )
    thresholds = base.clone().float() if isinstance(base, torch.Tensor) else torch.full((len(class_names),), float(base))
    for index, name in enumerate(class_names):
        if name in per_class_confidence:
            thresholds[index] = float(per_class_confidence[name])
    return thresholds


def _unit_interval(field: str, value) -> float:
    """``value`` as a float in [0, 1]; a ValueError naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"`{field}` must be a number within [0, 1], got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"`{field}` must be a number within [0, 1], got {value!r}.") from None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`{field}` must be within [0, 1], got {value!r}.")
    return number
