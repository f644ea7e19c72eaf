"""Video files as timed sources for ``InferencePipeline``: each grab's wall-clock time is recorded,
and with ``fps`` the file plays like a camera.

For a file, the pipeline's ``frame_timestamp`` is derived from the file's modification time and
frame rate, not from when the frame was decoded, so it cannot time the latency from decode to
result. These producers record ``time.perf_counter()`` after every successful grab (frame id k is
the k-th grab). With ``fps`` set, grabs are paced to that rate from the first one and the source
reports itself as a live, non-reconnectable stream, so the pipeline applies its stream buffering
(frames it cannot take in time are dropped) and stops at the file's end.

``pinned=True`` decodes every frame into a recycled page-locked buffer as ``pinned_video_source`` does,
so the preprocess sends it by one async copy without its staging fill (the staging copy taken out of a
many-camera run, to measure what it costs).

    >>> from inference_fastpath.examples.benchmarks.camera_sources import TimedSource
    >>> camera = TimedSource("clip.mp4", fps=30)  # pass it where the path would go  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from inference.core.interfaces.camera.video_source import CV2VideoFrameProducer

from inference_fastpath.adapters.cuda.pinned_video_source import PinnedVideoFrameProducer


class TimedVideoProducer(CV2VideoFrameProducer):
    """OpenCV's producer (opening, decoding, release unchanged) that records grab times and
    optionally paces grabs to ``fps``."""

    def __init__(self, video: str, fps: Optional[float] = None, stall: Optional[Tuple[int, float]] = None) -> None:
        super().__init__(video)
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if stall is not None and (stall[0] < 0 or stall[1] < 0):
            raise ValueError(f"stall must be (frames >= 0, seconds >= 0), got {stall}")
        self.fps = fps
        self.stall = stall
        self.grabbed_at: List[float] = []
        # when each grab was due by the camera's schedule (paced sources only): a grab later than its due
        # time means the source's own thread fell behind, not the pipeline
        self.due_at: List[float] = []
        self._started: Optional[float] = None

    def grab(self) -> bool:
        if self.stall is not None and len(self.grabbed_at) == self.stall[0]:
            time.sleep(self.stall[1])  # a camera that freezes for a while after this many frames
            if self._started is not None:
                self._started += self.stall[1]
        if self.fps is not None:
            now = time.perf_counter()
            if self._started is None:
                self._started = now
            due = self._started + len(self.grabbed_at) / self.fps
            if due > now:
                time.sleep(due - now)
        ok = super().grab()
        if ok:
            self.grabbed_at.append(time.perf_counter())
            if self.fps is not None:
                self.due_at.append(due)
        return ok

    def discover_source_properties(self):
        properties = super().discover_source_properties()
        if self.fps is None:
            return properties
        return dataclasses.replace(properties, is_file=False, is_reconnectable=False, timestamp_created=None)


class PinnedTimedVideoProducer(TimedVideoProducer, PinnedVideoFrameProducer):
    """Grabs timed and paced as :class:`TimedVideoProducer`, frames decoded into pinned buffers as
    :class:`PinnedVideoFrameProducer` (its own pool: pinned with CUDA, ordinary memory without)."""


class TimedSource:
    """A ``video_reference``: opens a :class:`TimedVideoProducer` for ``video`` (the latest one is
    kept in ``producer`` to read its grab times); ``pinned``: a :class:`PinnedTimedVideoProducer`."""

    def __init__(self, video: str, fps: Optional[float] = None, stall: Optional[Tuple[int, float]] = None,
                 pinned: bool = False) -> None:
        self.video = video
        self.fps = fps
        self.stall = stall
        self.pinned = bool(pinned)
        self.producer: Optional[TimedVideoProducer] = None

    def __call__(self) -> TimedVideoProducer:
        producer_class = PinnedTimedVideoProducer if self.pinned else TimedVideoProducer
        self.producer = producer_class(self.video, self.fps, self.stall)
        return self.producer

    def grabbed_at(self, frame_id: int) -> Optional[float]:
        """perf_counter time of the grab of frame ``frame_id`` (1-based), None if unknown."""
        times = self.producer.grabbed_at if self.producer is not None else []
        return times[frame_id - 1] if 0 < frame_id <= len(times) else None

    @property
    def grabbed(self) -> int:
        """How many frames the latest producer has grabbed."""
        return len(self.producer.grabbed_at) if self.producer is not None else 0

    def pacing(self) -> Dict[str, Optional[float]]:
        """How well the latest producer kept its camera's schedule: ``camera_fps``, its grab rate from first
        to last grab (a stall's pause included), and ``late_ms_p99`` / ``late_ms_max``, how long after their
        due time grabs came (``None`` for an unpaced source or fewer than two grabs).

        Example:
            >>> TimedSource("clip.mp4", fps=30).pacing()["camera_fps"] is None  # nothing grabbed yet
            True
        """
        producer = self.producer
        if producer is None or self.fps is None or len(producer.grabbed_at) < 2:
            return {"camera_fps": None, "late_ms_p99": None, "late_ms_max": None}
        grabbed = producer.grabbed_at
        late = np.maximum(0.0, np.subtract(grabbed[:len(producer.due_at)], producer.due_at)) * 1e3
        return {"camera_fps": (len(grabbed) - 1) / (grabbed[-1] - grabbed[0]) if grabbed[-1] > grabbed[0] else None,
                "late_ms_p99": float(np.percentile(late, 99)), "late_ms_max": float(late.max())}

    def __repr__(self) -> str:  # the pipeline's logs name the source by str()
        return ("pinned-timed:" if self.pinned else "timed:") + str(self.video) + (f"@{self.fps}fps" if self.fps else "")
