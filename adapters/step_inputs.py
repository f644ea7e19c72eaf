"""The per-run inputs of a step (thresholds, filters, caps, mask output), checked once, naming the field.

The manifest checks them inside a workflow; a direct call of the block, or a value that arrives through a
selector, is checked here by the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from inference_fastpath.adapters.options import ALLOWED_VALUES, InvalidOptionError


@dataclass(frozen=True)
class StepInputs:
    """What one step run asks of the model, besides the optimization options.

    Example:
        >>> StepInputs(model_id="my-project/3", max_detections=50).mask_output
        'compact'
    """

    model_id: str
    confidence_mode: str = "best"
    custom_confidence: Optional[float] = 0.4
    per_class_confidence: Optional[Dict[str, float]] = None
    class_filter: Optional[Tuple[str, ...]] = None
    max_detections: int = 300
    mask_output: str = "compact"

    def __post_init__(self) -> None:
        max_detections = self.max_detections
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"`max_detections` must be a positive integer, got {max_detections!r}.")
        class_filter = self.class_filter
        if class_filter is not None:
            if isinstance(class_filter, str) or not all(isinstance(name, str) for name in class_filter):
                raise ValueError(f"`class_filter` must be a list of class names, got {class_filter!r}.")
            object.__setattr__(self, "class_filter", tuple(class_filter))
        if self.mask_output not in ALLOWED_VALUES["mask_output"]:
            raise InvalidOptionError(
                f"Invalid value {self.mask_output!r} for option `mask_output`: expected one of "
                f"{list(ALLOWED_VALUES['mask_output'])}."
            )

    @classmethod
    def from_block(cls, model_id: str, class_filter: Optional[Sequence[str]] = None, **values: Any) -> "StepInputs":
        return cls(model_id=model_id, class_filter=class_filter, **values)
