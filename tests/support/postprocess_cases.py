"""Postprocess test inputs and the reference they are compared with."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from inference_models.models.common.roboflow.model_packages import PreProcessingMetadata

from inference_fastpath.adapters.contracts import FrameDetections, PostprocessRequest, RawOutputs
from inference_fastpath.adapters.contracts import detections_difference as frames_mismatch  # noqa: F401
from inference_fastpath.adapters.postprocess.reference import ReferencePostprocess
from inference_fastpath.adapters.postprocess.synthetic import make_metadata, synthetic_outputs  # noqa: F401


def reference_detections(
    raw: RawOutputs,
    metadata: Sequence[PreProcessingMetadata],
    request: PostprocessRequest,
    num_classes: int,
    classes_re_mapping: Optional[Any] = None,
) -> List[FrameDetections]:
    """inference-models' own postprocess of ``raw``, through the stage's reference twin."""
    return ReferencePostprocess(num_classes=num_classes, classes_re_mapping=classes_re_mapping)(
        raw, list(metadata), request
    )
