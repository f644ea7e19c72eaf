"""What the fast mask painters share: which calls they take, and how a direct call is refused.

Both fast painters (host crops, GPU kernel) take BGR uint8 frames and compact masks. Dense masks and
RLE-only predictions (the stock v3 and v4 blocks' outputs) go to the stock annotator, the reference
twin, through :class:`~inference_fastpath.adapters.fallback.FallbackStage`.

Every painter takes ``(scene, detections, annotator, copy=False)`` and returns the picture: with
``copy=False`` painted into ``scene`` itself, with ``copy=True`` (the stock block's ``copy_image``) in a
new frame, ``scene`` left as it was.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import supervision as sv
from inference.core.workflows.execution_engine.constants import RLE_MASK_KEY_IN_SV_DETECTIONS
from supervision.detection.compact_mask import CompactMask

from inference_fastpath.adapters.contracts import Verdict


def paint_problem(scene: np.ndarray, detections: sv.Detections) -> Optional[str]:
    """None when a fast painter takes this frame and these masks (compact, or none), else why not.

    Example:
        >>> paint_problem(np.zeros((2, 2, 3), np.uint8), sv.Detections.empty()) is None
        True
    """
    if not isinstance(scene, np.ndarray) or scene.dtype != np.uint8 or scene.ndim != 3 or scene.shape[2] != 3:
        return "the frame is not an (H, W, 3) uint8 array"
    if detections.mask is None:
        if RLE_MASK_KEY_IN_SV_DETECTIONS in detections.data:
            return "RLE-only masks (the stock v4 block's output): decoded and painted by the stock annotator"
        return None
    if not isinstance(detections.mask, CompactMask):
        return "dense masks (stock blocks' output): painted by supervision, crop by crop is ours"
    return None


class FastPainter:
    """The fast-stage contract (``adapters/fallback.py``) for painters: ``check``, ``run_checked``, and a
    direct call that refuses what ``check`` refuses, naming the reason."""

    name = "fast"

    def check(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
              copy: bool = False) -> Verdict:
        return Verdict(paint_problem(scene, detections))

    def run_checked(self, verdict: Verdict, scene: np.ndarray, detections: sv.Detections,
                    annotator: sv.MaskAnnotator, copy: bool = False) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
                 copy: bool = False) -> np.ndarray:
        verdict = self.check(scene, detections, annotator, copy)
        if verdict.reason is not None:
            raise ValueError(f"{type(self).__name__} cannot paint this call: {verdict.reason}")
        return self.run_checked(verdict, scene, detections, annotator, copy)
