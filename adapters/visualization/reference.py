"""Reference mask painting: supervision's ``MaskAnnotator``, exactly as the stock block calls it."""

from __future__ import annotations

import numpy as np
import supervision as sv


class AnnotatorPainter:
    """Example:
        >>> frame = AnnotatorPainter()(frame, detections, sv.MaskAnnotator())  # doctest: +SKIP
    """

    name = "reference"

    def __call__(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
                 copy: bool = False) -> np.ndarray:
        from inference.core.workflows.core_steps.visualizations.common.utils import ensure_dense_masks

        return annotator.annotate(scene=scene.copy() if copy else scene, detections=ensure_dense_masks(detections))
