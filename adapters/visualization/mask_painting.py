"""The fast twin of supervision's ``MaskAnnotator``: compact masks painted on the GPU.

Same picture as the stock ``mask_visualization@v1`` block (within one intensity level: the blend's
rounding): the smallest mask is drawn over larger ones, colours come from the annotator's palette and
colour axis, ``out = colour * opacity + frame * (1 - opacity)`` where a mask covers the pixel. The masks
must be a ``supervision.CompactMask`` (what our segmentation block outputs): their runs go to the GPU
as they are (``kernels/mask_overlay.py``), only the region the masks cover travels to the GPU and back.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Tuple

import numpy as np
import supervision as sv
import torch
from supervision.annotators.utils import resolve_color
from supervision.detection.compact_mask import CompactMask

from inference_fastpath.adapters.contracts import Verdict
from inference_fastpath.adapters.device_placement import on_device
from inference_fastpath.adapters.postprocess.compact import run_edges
from inference_fastpath.adapters.visualization.painting_contract import FastPainter
from inference_fastpath.kernels.mask_overlay import MaskRuns, launch_blend, launch_paint_labels
from inference_fastpath.kernels.triton_runtime import unavailable_reason


class GpuMaskPainter(FastPainter):
    """Paints ``detections``' compact masks into a BGR frame like ``annotator.annotate`` would.

    Example:
        >>> painter = GpuMaskPainter(torch.device("cuda"))  # doctest: +SKIP
        >>> frame = painter(frame, detections, sv.MaskAnnotator(opacity=0.5))  # doctest: +SKIP
    """

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._labels: Optional[torch.Tensor] = None
        self._stream: Optional[torch.cuda.Stream] = None

    def check(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator) -> Verdict:
        """Whether this call paints here (the fast-stage contract, ``adapters/fallback.py``)."""
        unavailable = unavailable_reason(self.device)
        if unavailable is not None:
            return Verdict(unavailable)
        return super().check(scene, detections, annotator)

    def run_checked(self, verdict: Verdict, scene: np.ndarray, detections: sv.Detections,
                    annotator: sv.MaskAnnotator) -> np.ndarray:
        masks = detections.mask
        if masks is None or len(detections) == 0:
            return scene
        region = _covered_region(masks, scene.shape[:2])
        if region is None:
            return scene
        order = np.flip(np.argsort(detections.area))  # painted first to last, as supervision paints
        priority = np.empty(len(order), dtype=np.int64)
        priority[order] = np.arange(len(order))
        colours = np.array(
            [resolve_color(color=annotator.color, detections=detections, detection_idx=int(i),
                           color_lookup=annotator.color_lookup).as_bgr() for i in order],
            dtype=np.uint8,
        ).reshape(-1, 3)
        runs = MaskRuns.from_edges(*run_edges(masks), priority)  # the block's masks: full-frame runs, no crops
        x0, y0, x1, y1 = region
        with self._lock, on_device(self.device), self._own_stream():  # Triton launches on the current device
            labels = self._label_plane(y1 - y0, x1 - x0)
            labels.fill_(-1)
            shifted = MaskRuns(_shift(runs.pieces, x0, y0))
            patch = torch.from_numpy(np.ascontiguousarray(scene[y0:y1, x0:x1])).to(self.device, non_blocking=True)
            launch_paint_labels(shifted, labels)
            launch_blend(patch, labels, torch.from_numpy(colours).to(self.device), annotator.opacity,
                         (0, 0, x1 - x0, y1 - y0))
            scene[y0:y1, x0:x1] = patch.cpu().numpy()
        return scene

    def _own_stream(self):
        """A stream of the painter's own on CUDA: with downstream overlap the segmentation step's next frame
        is queued on the GPU while this frame is painted, and the painting must not wait behind it."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device, priority=-1)
        return torch.cuda.stream(self._stream)

    def _label_plane(self, height: int, width: int) -> torch.Tensor:
        need = height * width
        if self._labels is None or self._labels.numel() < need:
            self._labels = torch.empty(need, dtype=torch.int32, device=self.device)
        return self._labels[:need].view(height, width)


def _covered_region(masks: CompactMask, image_hw: Tuple[int, int]) -> Optional[Tuple[int, int, int, int]]:
    """The union of the mask crops, clipped to the frame: ``(x0, y0, x1, y1)`` exclusive, or None."""
    height, width = image_hw
    offsets = masks._offsets.astype(np.int64)
    shapes = masks._crop_shapes.astype(np.int64)
    x0 = max(0, int(offsets[:, 0].min()))
    y0 = max(0, int(offsets[:, 1].min()))
    x1 = min(width, int((offsets[:, 0] + shapes[:, 1]).max()))
    y1 = min(height, int((offsets[:, 1] + shapes[:, 0]).max()))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _shift(pieces: np.ndarray, x0: int, y0: int) -> np.ndarray:
    shifted = pieces.copy()
    shifted[:, 3] -= x0
    shifted[:, 4] -= y0
    return shifted
