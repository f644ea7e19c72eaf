"""The fast twin of supervision's ``MaskAnnotator``: compact masks painted on the GPU.

Same picture as the stock ``mask_visualization@v1`` block (within one intensity level: the blend's
rounding): the smallest mask is drawn over larger ones, colours come from the annotator's palette and
colour axis, ``out = colour * opacity + frame * (1 - opacity)`` where a mask covers the pixel. The masks
must be a ``supervision.CompactMask`` (what our segmentation block outputs): their runs go to the GPU
as they are (``kernels/mask_overlay.py``), and only the rows the masks cover travel to the GPU and back.

``copy=True`` (the stock block's ``copy_image``) leaves the frame alone and returns the picture in a new
frame taken from a recycled pinned pool: the painted rows come back by DMA straight into it, so the
copy the stock block makes first costs no separate pass over the frame.
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
from inference_fastpath.adapters.cuda.pinned_frames import PinnedFramePool
from inference_fastpath.adapters.device_placement import on_device
from inference_fastpath.adapters.postprocess.compact import run_edges
from inference_fastpath.adapters.visualization.painting_contract import FastPainter
from inference_fastpath.kernels.mask_overlay import MaskRuns, launch_blend, launch_paint_labels
from inference_fastpath.kernels.triton_runtime import unavailable_reason

# Pinned memory for the painted frames handed downstream (copy=True): ~40 1080p frames held at once
# (a video writer's queue, a sink) before new ones come from ordinary memory.
OUTPUT_POOL_BYTES = 256 << 20


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
        self._pixels: Optional[torch.Tensor] = None
        # the frames handed out with copy=True; one is reused once nothing downstream references it
        self._outputs = PinnedFramePool(OUTPUT_POOL_BYTES, pin=self.device.type == "cuda", use="painting")
        self._stream: Optional[torch.cuda.Stream] = None

    def check(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
              copy: bool = False) -> Verdict:
        """Whether this call paints here (the fast-stage contract, ``adapters/fallback.py``)."""
        unavailable = unavailable_reason(self.device)
        if unavailable is not None:
            return Verdict(unavailable)
        return super().check(scene, detections, annotator, copy)

    def run_checked(self, verdict: Verdict, scene: np.ndarray, detections: sv.Detections,
                    annotator: sv.MaskAnnotator, copy: bool = False) -> np.ndarray:
        masks = detections.mask
        region = _covered_region(masks, scene.shape[:2]) if masks is not None and len(detections) else None
        if region is None:
            return scene.copy() if copy else scene
        order = np.flip(np.argsort(detections.area))  # painted first to last, as supervision paints
        priority = np.empty(len(order), dtype=np.int64)
        priority[order] = np.arange(len(order))
        colours = np.array(
            [resolve_color(color=annotator.color, detections=detections, detection_idx=int(i),
                           color_lookup=annotator.color_lookup).as_bgr() for i in order],
            dtype=np.uint8,
        ).reshape(-1, 3)
        x0, y0, x1, y1 = region
        edges, heights, corners = run_edges(masks)  # the block's masks: full-frame runs, no crops
        # corners relative to the band sent (rows y0..y1), so the runs address it directly
        runs = MaskRuns.from_edges(edges, heights, corners - np.array([0, y0]), priority)
        # whole rows: a band of a C-contiguous frame is one contiguous block, sent and received without
        # a host copy; only the region's columns are blended
        band = scene[y0:y1]
        sent = band if band.flags.c_contiguous else np.ascontiguousarray(band)
        with self._lock, on_device(self.device), self._own_stream():  # Triton launches on the current device
            pixels = self._device_band(y1 - y0, scene.shape[1])
            pixels.copy_(torch.from_numpy(sent), non_blocking=True)
            labels = self._label_plane(y1 - y0, scene.shape[1])
            launch_paint_labels(runs, labels)
            launch_blend(pixels, labels, torch.from_numpy(colours).to(self.device), annotator.opacity,
                         (x0, 0, x1, y1 - y0))
            if copy:
                return self._received_copy(scene, pixels, y0, y1)
            if sent is band:  # in place: straight into the caller's frame
                torch.from_numpy(band).copy_(pixels)
            else:
                band[...] = pixels.cpu().numpy()
        return scene

    def _received_copy(self, scene: np.ndarray, pixels: torch.Tensor, y0: int, y1: int) -> np.ndarray:
        """A new frame: the painted band from the GPU, the other rows from ``scene``.

        The frame comes from a recycled pinned pool, so the band arrives by DMA while the host copies
        the rows around it; past the pool's budget it is ordinary memory."""
        height, width = scene.shape[:2]
        pooled = self._outputs.take(height, width)
        out = pooled if pooled is not None else np.empty_like(scene, order="C")
        torch.from_numpy(out[y0:y1]).copy_(pixels, non_blocking=pooled is not None and self._outputs.pin)
        out[:y0] = scene[:y0]
        out[y1:] = scene[y1:]
        if self._stream is not None:
            self._stream.synchronize()
        return out

    def _own_stream(self):
        """A stream of the painter's own on CUDA: with downstream overlap the segmentation step's next frame
        is queued on the GPU while this frame is painted, and the painting must not wait behind it."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device, priority=-1)
        return torch.cuda.stream(self._stream)

    def _label_plane(self, height: int, width: int) -> torch.Tensor:
        """The kernel's column-major ``(W, H)`` label plane for the band, every pixel unlabelled (-1)."""
        need = height * width
        if self._labels is None or self._labels.numel() < need:
            self._labels = torch.empty(need, dtype=torch.int32, device=self.device)
        return self._labels[:need].view(width, height).fill_(-1)

    def _device_band(self, height: int, width: int) -> torch.Tensor:
        need = height * width * 3
        if self._pixels is None or self._pixels.numel() < need:
            self._pixels = torch.empty(need, dtype=torch.uint8, device=self.device)
        return self._pixels[:need].view(height, width, 3)


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

