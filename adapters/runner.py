"""Runs one RF-DETR segmentation model as explicit stages: preprocess -> engine -> postprocess -> block output.

A runner is built once per (loaded model, stage options) and shared by every step and pipeline that asks
for the same pair (``RUNNERS``); launches and completions are each serialised because fast engines own
static buffers, and a completion may overlap the next launch (depth-2 scheduling).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from inference_fastpath.adapters.block_output import empty_frame_detections, to_sv_detections
from inference_fastpath.adapters.contracts import (
    Frame,
    FrameDetections,
    PostprocessRequest,
    RawOutputs,
    StageTimings,
)
from inference_fastpath.adapters.frames import split_valid_frames
from inference_fastpath.adapters.device_placement import on_device, resolve_device
from inference_fastpath.adapters.model_loading import MODEL_REGISTRY, LoadedModel
from inference_fastpath.adapters.options import FastpathOptions
from inference_fastpath.adapters.selection import StageChoice, select_stages
from inference_fastpath.adapters.step_inputs import StepInputs
from inference_fastpath.adapters.thresholds import resolve_threshold
from inference_fastpath.adapters.timeline import Timeline

LOGGER = logging.getLogger("inference_fastpath")


@dataclass
class Launched:
    """A batch whose engine work has been submitted."""

    metadata: list
    raw: RawOutputs
    timings: StageTimings
    trace: Optional[dict] = None  # timeline entry, when a benchmark records one


class SegmentationRunner:
    """The stages of one model under one set of options.

    Example:
        >>> runner = RUNNERS.get("my-project/3", FastpathOptions(mask_output="rle"))  # doctest: +SKIP
        >>> outputs = runner.submit(images, StepInputs(model_id="my-project/3"), SynchronousScheduler())  # doctest: +SKIP
        >>> outputs[0]["predictions"]  # an sv.Detections  # doctest: +SKIP
    """

    def __init__(self, loaded: LoadedModel, options: FastpathOptions) -> None:
        self.loaded = loaded
        self.options = options
        self.device = loaded.device
        with on_device(self.device):  # buffers, streams and graphs of every stage on the step's device
            stages = select_stages(options, loaded)
        self.preprocess, self.engine, self.postprocess = stages.preprocess, stages.engine, stages.postprocess
        self.choices: Tuple[StageChoice, ...] = stages.choices
        self._launch_lock = threading.Lock()
        self._complete_lock = threading.Lock()
        # Per-run stage timings of the most recent runs, for benchmarks (bounded, never grows).
        self.timings: Deque[StageTimings] = deque(maxlen=10_000)
        self.timeline: Optional[Timeline] = None  # benchmarks switch it on (adapters/timeline.py)
        self._last_submit_finished: Optional[float] = None
        self.batch_sizes: Counter = Counter()  # launches per batch size, for graph_report()

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.loaded.class_names

    @functools.cached_property
    def class_name_array(self) -> np.ndarray:
        """The class names as a numpy string array, built once (the block output indexes it per frame)."""
        return np.asarray(self.loaded.class_names, dtype=str)

    # ------------------------------------------------------------------ one step run

    def request(self, inputs: StepInputs) -> PostprocessRequest:
        """The postprocess request of a step run: thresholds resolved as the stock block resolves them."""
        threshold = resolve_threshold(
            confidence_mode=inputs.confidence_mode,
            custom_confidence=inputs.custom_confidence,
            per_class_confidence=inputs.per_class_confidence,
            class_names=self.class_names,
            recommended_parameters=getattr(self.loaded.model, "recommended_parameters", None),
        )
        return PostprocessRequest(threshold=threshold, max_detections=inputs.max_detections,
                                  mask_format=inputs.mask_output)

    def submit(self, images: Sequence[Any], inputs: StepInputs, scheduler, step_name: str = "") -> List[Any]:
        """One step run: a block output dict per image (a ``Future`` of it from a depth-2 scheduler).

        Frames are validated once, here; a frame the model cannot run on gets no detections and an
        error log naming it, so a video stream keeps running.
        """
        submitted = time.perf_counter()
        request = self.request(inputs)
        frames, invalid = split_valid_frames(images, step_name)

        def launch() -> Optional[Launched]:
            return self.launch(frames) if frames else None

        def finish(launched: Optional[Launched]) -> List[Dict[str, Any]]:
            detections, timings = self.complete(launched, request) if launched is not None else ([], None)
            output_started = time.perf_counter()
            found = iter(detections)
            outputs = []
            for index, image in enumerate(images):
                frame = empty_frame_detections(image.numpy_image, inputs.mask_output) if index in invalid else next(found)
                inference_id = str(uuid.uuid4())
                outputs.append({
                    "inference_id": inference_id,
                    "predictions": to_sv_detections(frame, class_names=self.class_name_array, image=image,
                                                    inference_id=inference_id, class_filter=inputs.class_filter),
                    "model_id": inputs.model_id,
                })
            self._record(timings, launched, submitted, output_started)
            return outputs

        return scheduler.submit(launch, finish, count=len(images))

    def _record(self, timings: Optional[StageTimings], launched: Optional[Launched], submitted: float,
                output_started: float) -> None:
        finished = time.perf_counter()
        if timings is not None:
            timings.output_ms = (finished - output_started) * 1e3
            # Time between two step runs: waiting for the next decoded frame + workflow overhead.
            if self._last_submit_finished is not None:
                timings.extra["between_runs_ms"] = (submitted - self._last_submit_finished) * 1e3
            self.timings.append(timings)
            if self.timeline is not None:
                self.timeline.mark(launched.trace, "result_ready")
        self._last_submit_finished = finished

    def graph_report(self) -> Dict[str, Any]:
        """Launches per batch size and each stage's CUDA-graph summary (None for a stage without graphs).

        A live pipeline with a batch collection timeout hands over partial batches; this shows how
        many sizes came and what they cost each stage in captures.

        Example:
            >>> runner.graph_report()  # doctest: +SKIP
            {'batch_sizes': {16: 120}, 'preprocess': {...}, 'engine': {'captures': 2, ...}, 'postprocess': {...}}
        """
        with self._launch_lock:  # a launch may add a size meanwhile
            sizes = dict(self.batch_sizes)
        report: Dict[str, Any] = {"batch_sizes": dict(sorted(sizes.items()))}
        for stage_name, stage in (("preprocess", self.preprocess), ("engine", self.engine),
                                  ("postprocess", self.postprocess)):
            summary = getattr(stage, "graph_summary", None)
            report[stage_name] = summary() if summary is not None else None
        return report

    # ------------------------------------------------------------------ the stages

    def launch(self, frames: Sequence[Frame]) -> Launched:
        """Preprocess + engine on validated frames. On a GPU this only enqueues work."""
        timings = StageTimings()
        timeline = self.timeline
        trace = timeline.start() if timeline is not None else None
        with self._launch_lock, on_device(self.device):
            self.batch_sizes[len(frames)] += 1
            started = time.perf_counter()
            batch = self.preprocess(frames, input_buffer=self.engine.input_buffer)
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

    def complete(self, launched: Launched, request: PostprocessRequest
                 ) -> Tuple[List[FrameDetections], StageTimings]:
        """Postprocess; ends with the detections on the host."""
        with self._complete_lock, on_device(self.device):
            started = time.perf_counter()
            detections = self.postprocess(launched.raw, launched.metadata, request)
            launched.timings.postprocess_ms = (time.perf_counter() - started) * 1e3
        if self.timeline is not None:
            self.timeline.mark(launched.trace, "postprocess_done")
        return detections, launched.timings

    def infer(self, frames: Sequence[Frame], request: PostprocessRequest
              ) -> Tuple[List[FrameDetections], StageTimings]:
        return self.complete(self.launch(frames), request)


class RunnerCache:
    """Process-wide runners, one per (loaded model, stage options); models load through ``MODEL_REGISTRY``
    under the request's key and access rules."""

    def __init__(self) -> None:
        self._runners: Dict[tuple, SegmentationRunner] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str, options: FastpathOptions, api_key: Optional[str] = None) -> SegmentationRunner:
        device = resolve_device(options.device)
        loaded = MODEL_REGISTRY.get(model_id=model_id, engine=options.engine, device=str(device), api_key=api_key)
        stage_options = options.stage_options(device=str(device))
        key = (loaded.key, stage_options)
        with self._lock:
            runner = self._runners.get(key)
            if runner is None:
                runner = SegmentationRunner(loaded, stage_options)
                self._runners[key] = runner
            return runner

    def runners(self) -> List[SegmentationRunner]:
        with self._lock:
            return list(self._runners.values())

    def clear(self) -> None:
        with self._lock:
            self._runners.clear()


RUNNERS = RunnerCache()
