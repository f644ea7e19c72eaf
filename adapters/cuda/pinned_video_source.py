"""A video source for ``InferencePipeline`` whose OpenCV decoder writes into pinned frames.

    from inference_fastpath.adapters.cuda.pinned_video_source import pinned_video_source
    InferencePipeline.init_with_workflow(video_reference=pinned_video_source("in.mp4"), ...)

Each frame is decoded into a recycled page-locked buffer (``pinned_frames.py``), so the
Triton preprocess sends it to the GPU by one async copy, without the staging fill. Everything
else (opening, properties, release) is OpenCV's producer from ``inference``, unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import cv2

from inference.core.interfaces.camera.video_source import CV2VideoFrameProducer

from inference_fastpath.adapters.cuda.pinned_frames import DEFAULT_PINNED_BUDGET_BYTES, PinnedFramePool


class PinnedVideoFrameProducer(CV2VideoFrameProducer):
    """OpenCV's video producer (opening, properties, release: unchanged) whose ``retrieve``
    decodes into a frame from a :class:`PinnedFramePool`."""

    def __init__(self, video, pool: Optional[PinnedFramePool] = None) -> None:
        super().__init__(video)
        self.pool = pool if pool is not None else PinnedFramePool()
        self._shape: Optional[Tuple[int, int]] = None
        self.pooled_frames = 0
        self.other_frames = 0

    def retrieve(self):
        if self._shape is None:
            height = int(self.stream.get(cv2.CAP_PROP_FRAME_HEIGHT))
            width = int(self.stream.get(cv2.CAP_PROP_FRAME_WIDTH))
            self._shape = (height, width) if height > 0 and width > 0 else (0, 0)
        target = self.pool.take(*self._shape) if self._shape != (0, 0) else None
        if target is None:
            self.other_frames += 1
            return self.stream.retrieve()
        ok, frame = self.stream.retrieve(target)
        if ok and frame is not None and frame.ctypes.data != target.ctypes.data:
            # the decoder allocated anew (frame size or format differs from the reported one):
            # follow the frame's own shape from now on
            if frame.ndim == 3 and frame.shape[2] == 3:
                self._shape = frame.shape[:2]
            else:
                self._shape = (0, 0)
                self.pool.fall_back(f"decoder returns frames of shape {frame.shape}, not (H, W, 3)")
            self.other_frames += 1
            return ok, frame
        if ok:
            self.pooled_frames += 1
        return ok, frame


class PinnedVideoSource:
    """A ``video_reference`` for ``InferencePipeline`` that decodes ``video`` (a file path, URL or
    camera index for OpenCV) into pinned frames: pass it where the path would go. Each call opens
    a new producer with a pool of its own (the pipeline calls it again on a restart)."""

    def __init__(self, video, budget_bytes: int = DEFAULT_PINNED_BUDGET_BYTES) -> None:
        self.video = video
        self.budget_bytes = int(budget_bytes)
        self.producer: Optional[PinnedVideoFrameProducer] = None  # the latest one (diagnostics)

    def __call__(self) -> PinnedVideoFrameProducer:
        self.producer = PinnedVideoFrameProducer(self.video, PinnedFramePool(self.budget_bytes))
        return self.producer

    def __repr__(self) -> str:  # the pipeline's logs name the source by str()
        return f"pinned:{self.video}"


def pinned_video_source(video, budget_bytes: int = DEFAULT_PINNED_BUDGET_BYTES) -> PinnedVideoSource:
    """See :class:`PinnedVideoSource`."""
    return PinnedVideoSource(video, budget_bytes)


__all__ = ["PinnedVideoFrameProducer", "PinnedVideoSource", "pinned_video_source"]
