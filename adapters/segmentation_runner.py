"""Runs one RF-DETR segmentation model as explicit stages: preprocess -> engine -> postprocess.

A runner is built once per (loaded model, options) and shared by every step and pipeline that asks for
the same pair; a lock serialises calls because fast engines own static buffers.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from inference_fastpath.adapters.frames import normalise_frames
from inference_fastpath.adapters.model_loading import MODEL_REGISTRY, LoadedModel
from inference_fastpath.adapters.options import FastpathOptions
from inference_fastpath.adapters.timeline import Timeline
from inference_fastpath.adapters.stage_selection import (
    StageChoice,
    select_engine,
    select_postprocess,
    select_preprocess,
)
from inference_fastpath.adapters.stages.contracts import (
    Frame,
    FrameDetections,
    PostprocessRequest,
    RawOutputs,
    StageTimings,
)

LOGGER = logging.getLogger("inference_fastpath")


class SegmentationRunner:
    def __init__(self, loaded: LoadedModel, options: FastpathOptions) -> None:
        self.loaded = loaded
        self.options = options
        self.preprocess, preprocess_choice = select_preprocess(options, loaded)
        self.engine, engine_choice = select_engine(options, loaded)
        self.postprocess, postprocess_choice = select_postprocess(options, loaded)
        self.choices: Tuple[StageChoice, ...] = (preprocess_choice, engine_choice, postprocess_choice)
        # Launches (which write the engine's static buffers) and completions are each serialised;
        # a completion may overlap the next launch (depth-2 scheduling).
        self._launch_lock = threading.Lock()
        self._complete_lock = threading.Lock()
        # Per-run stage timings of the most recent runs, for benchmarks (bounded, never grows).
        self.timings: Deque[StageTimings] = deque(maxlen=10_000)
        self.timeline: Optional[Timeline] = None  # benchmarks switch it on (adapters/timeline.py)

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.loaded.class_names

    @functools.cached_property
    def class_name_array(self) -> np.ndarray:
        """The class names as a numpy string array, built once (the block indexes it per frame)."""
        return np.asarray(self.loaded.class_names, dtype=str)

    def launch(self, frames: Sequence[Frame]) -> "Launched":
        """Preprocess + engine. On a GPU this only enqueues work; the outputs are read in `complete`."""
        frames = normalise_frames(frames)  # cheap when the block already normalised them
        timings = StageTimings()
        timeline = self.timeline
        trace = timeline.start() if timeline is not None else None
        with self._launch_lock:
            started = time.perf_counter()
            batch = self._preprocess_into_engine_input(frames)
            after_preprocess = time.perf_counter()
            raw = self.engine(batch)
            after_engine = time.perf_counter()
        timings.preprocess_ms = (after_preprocess - started) * 1e3
        timings.engine_ms = (after_engine - after_preprocess) * 1e3
        if timeline is not None:
            trace.update(preprocess_submitted=after_preprocess, engine_submitted=after_engine)
            timeline.mark_gpu(trace, "preprocess_done_gpu", batch.ready_event)
            timeline.mark_gpu(trace, "engine_done_gpu", raw.done_event)
        return Launched(metadata=batch.metadata, raw=raw, timings=timings, trace=trace)

    def _preprocess_into_engine_input(self, frames: Sequence[Frame]):
        """A fast preprocess writes straight into the engine's static input buffer (no copy)."""
        fast = getattr(self.preprocess, "fast_stage", None)
        input_buffer = getattr(self.engine, "input_buffer", None)
        if fast is None or input_buffer is None or fast.unsupported_reason(frames) is not None:
            return self.preprocess(frames)
        return fast.run_supported(frames, out=input_buffer(len(frames)))

    def complete(
        self, launched: "Launched", request: PostprocessRequest
    ) -> Tuple[List[FrameDetections], StageTimings]:
        """Postprocess; ends with the detections on the host."""
        with self._complete_lock:
            started = time.perf_counter()
            detections = self.postprocess(launched.raw, launched.metadata, request)
            launched.timings.postprocess_ms = (time.perf_counter() - started) * 1e3
        if self.timeline is not None:
            self.timeline.mark(launched.trace, "postprocess_done")
        return detections, launched.timings

    def infer(
        self, frames: Sequence[Frame], request: PostprocessRequest
    ) -> Tuple[List[FrameDetections], StageTimings]:
        return self.complete(self.launch(frames), request)


@dataclass
class Launched:
    """A batch whose engine work has been submitted."""

    metadata: list
    raw: RawOutputs
    timings: StageTimings
    trace: Optional[dict] = None  # timeline entry, when a benchmark records one


class _RunnerCache:
    def __init__(self) -> None:
        self._runners: Dict[tuple, SegmentationRunner] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str, options: FastpathOptions, api_key=None) -> SegmentationRunner:
        device = options.device or _default_device()
        loaded = MODEL_REGISTRY.get(model_id=model_id, engine=options.engine, device=device, api_key=api_key)
        key = (loaded.key, options)
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = SegmentationRunner(loaded, options)
                self._runners[key] = runner
            return runner

    def clear(self) -> None:
        with self._lock:
            self._runners.clear()


def _default_device() -> str:
    from inference_fastpath.adapters.model_loading import default_device

    return default_device()


RUNNERS = _RunnerCache()
