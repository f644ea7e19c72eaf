"""Runs one RF-DETR segmentation model as explicit stages: preprocess -> engine -> postprocess.

A runner is built once per (loaded model, options) and shared by every step and pipeline that asks for
the same pair; a lock serialises calls because fast engines own static buffers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Sequence, Tuple

from inference_fastpath.adapters.frames import normalise_frames
from inference_fastpath.adapters.model_loading import MODEL_REGISTRY, LoadedModel
from inference_fastpath.adapters.options import FastpathOptions
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

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.loaded.class_names

    def launch(self, frames: Sequence[Frame]) -> "Launched":
        """Preprocess + engine. On a GPU this only enqueues work; the outputs are read in `complete`."""
        frames = normalise_frames(frames)  # cheap when the block already normalised them
        timings = StageTimings()
        with self._launch_lock:
            started = time.perf_counter()
            batch = self.preprocess(frames)
            after_preprocess = time.perf_counter()
            raw = self.engine(batch)
            after_engine = time.perf_counter()
        timings.preprocess_ms = (after_preprocess - started) * 1e3
        timings.engine_ms = (after_engine - after_preprocess) * 1e3
        return Launched(metadata=batch.metadata, raw=raw, timings=timings)

    def complete(
        self, launched: "Launched", request: PostprocessRequest
    ) -> Tuple[List[FrameDetections], StageTimings]:
        """Postprocess; ends with the detections on the host."""
        with self._complete_lock:
            started = time.perf_counter()
            detections = self.postprocess(launched.raw, launched.metadata, request)
            launched.timings.postprocess_ms = (time.perf_counter() - started) * 1e3
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
