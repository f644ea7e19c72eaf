"""Helpers to run workflows the way users do: ``ExecutionEngine`` on images, ``InferencePipeline`` on video.

Call ``configure_environment()`` before anything imports ``inference``: the runtime reads these
variables at import time.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

RUNTIME_ENVIRONMENT = {
    "WORKFLOWS_PLUGINS": "inference_fastpath",
    "DISABLE_VERSION_CHECK": "True",
    "METRICS_ENABLED": "False",
    "ACTIVE_LEARNING_ENABLED": "False",
    "CORE_MODEL_GAZE_ENABLED": "False",
}


# The demo, run_video and the benchmarks are their own operator: they load the local demo package.
LOCAL_PACKAGES_OPT_IN = {"ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES": "True"}


def configure_environment(allow_local_packages: bool = True) -> None:
    """Set the runtime variables (unless already set); ``allow_local_packages`` opts this process in
    to loading local package directories, as an operator does for their own scripts."""
    settings = {**RUNTIME_ENVIRONMENT, **(LOCAL_PACKAGES_OPT_IN if allow_local_packages else {})}
    for name, value in settings.items():
        os.environ.setdefault(name, value)
    plugins = os.environ["WORKFLOWS_PLUGINS"].split(",")
    if "inference_fastpath" not in plugins:
        os.environ["WORKFLOWS_PLUGINS"] = ",".join(plugins + ["inference_fastpath"])


def execution_engine(workflow_definition: dict, max_concurrent_steps: int = 1, executor: Any = None):
    """An ``ExecutionEngine`` with the stock model manager, so stock model blocks run beside ours.

    ``executor``: a ``ThreadPoolExecutor`` the engine runs every step on, as ``InferencePipeline`` hands
    it one (None: the engine makes a pool per run)."""
    configure_environment()
    from inference.core.managers.base import ModelManager
    from inference.core.registries.roboflow import RoboflowModelRegistry
    from inference.core.workflows.core_steps.common.entities import StepExecutionMode
    from inference.core.workflows.execution_engine.core import ExecutionEngine
    from inference.models.utils import ROBOFLOW_MODEL_TYPES

    model_manager = ModelManager(model_registry=RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES))
    return ExecutionEngine.init(
        workflow_definition=workflow_definition,
        init_parameters={
            "workflows_core.model_manager": model_manager,
            "workflows_core.api_key": None,
            "workflows_core.step_execution_mode": StepExecutionMode.LOCAL,
        },
        max_concurrent_steps=max_concurrent_steps,
        executor=executor,
    )


@dataclass
class PipelineRun:
    """Everything a pipeline run delivered to its sink, in delivery order."""

    results: List[Dict[str, Any]] = field(default_factory=list)
    frame_ids: List[int] = field(default_factory=list)
    source_ids: List[int] = field(default_factory=list)
    first_result_at: Optional[float] = None
    warm_started_at: Optional[float] = None
    last_result_at: Optional[float] = None
    started_at: float = 0.0
    finished_at: float = 0.0
    errors: List[Dict[str, Any]] = field(default_factory=list)

    def fps_after_warmup(self) -> Optional[float]:
        """Frames per second counted from the first result after the warm-up to the last result."""
        if self.warm_started_at is None or self.last_result_at is None:
            return None
        counted = len(self.results) - self.warmup_frames
        elapsed = self.last_result_at - self.warm_started_at
        return counted / elapsed if counted > 0 and elapsed > 0 else None

    warmup_frames: int = 0


def run_pipeline(
    video_reference,
    workflow_definition: dict,
    workflows_parameters: Optional[Dict[str, Any]] = None,
    on_result: Optional[Callable[[Dict[str, Any], Any], None]] = None,
    warmup_frames: int = 1,
    max_fps: Optional[float] = None,
    stop_after: Optional[int] = None,
    keep_results: bool = True,
    buffering: str = "wait",
    batch_collection_timeout: Optional[float] = None,
) -> PipelineRun:
    """Runs ``InferencePipeline.init_with_workflow`` to the end of the video(s), dropping no frame.

    ``keep_results=False`` counts results without keeping them (long videos, annotated frames).
    ``buffering="live"`` uses the buffering users set for live streams instead (drop the oldest
    buffered frame when full, always process the newest): frames may then be dropped.
    ``batch_collection_timeout`` (several sources): how long a batch waits for a source's frame
    before it goes without it; None waits, so one stalled source stalls every stream.

    Example:
        >>> run = run_pipeline("video.mp4", load_workflow(FASTPATH), {"model_id": "my-project/3"})  # doctest: +SKIP
        >>> run.fps_after_warmup()  # doctest: +SKIP
    """
    configure_environment()
    from inference import InferencePipeline
    from inference.core.interfaces.camera.video_source import (
        BufferConsumptionStrategy,
        BufferFillingStrategy,
    )

    strategies = {
        "wait": (BufferFillingStrategy.WAIT, BufferConsumptionStrategy.LAZY),
        "live": (BufferFillingStrategy.DROP_OLDEST, BufferConsumptionStrategy.EAGER),
    }
    if buffering not in strategies:
        raise ValueError(f"buffering must be one of {sorted(strategies)}, got {buffering!r}")
    filling, consumption = strategies[buffering]
    run = PipelineRun(warmup_frames=warmup_frames)
    lock = threading.Lock()

    def sink(predictions, video_frames) -> None:
        now = time.perf_counter()
        predictions = predictions if isinstance(predictions, list) else [predictions]
        video_frames = video_frames if isinstance(video_frames, list) else [video_frames]
        with lock:
            for prediction, frame in zip(predictions, video_frames):
                if prediction is None or frame is None:
                    continue
                run.results.append(prediction if keep_results else None)
                run.frame_ids.append(frame.frame_id)
                run.source_ids.append(frame.source_id)
                if run.first_result_at is None:
                    run.first_result_at = now
                if len(run.results) == warmup_frames + 1 or (warmup_frames == 0 and len(run.results) == 1):
                    run.warm_started_at = now
                run.last_result_at = now
                if on_result is not None:
                    on_result(prediction, frame)
        if stop_after is not None and len(run.results) >= stop_after:
            pipeline.terminate()  # stop mid-stream; frames already handed to the workflow still arrive

    def on_status(update) -> None:
        if getattr(update, "severity", None) is not None and update.severity.name == "ERROR":
            run.errors.append({"event": update.event_type, **(update.payload or {})})

    pipeline = InferencePipeline.init_with_workflow(
        video_reference=video_reference,
        workflow_specification=workflow_definition,
        workflows_parameters=workflows_parameters or {},
        on_prediction=sink,
        status_update_handlers=[on_status],
        max_fps=max_fps,
        source_buffer_filling_strategy=filling,
        source_buffer_consumption_strategy=consumption,
        batch_collection_timeout=batch_collection_timeout,
        api_key=None,
    )
    run.started_at = time.perf_counter()
    pipeline.start()
    pipeline.join()
    run.finished_at = time.perf_counter()
    return run


def frame_sequence(results: Sequence[Dict[str, Any]], key: str = "predictions") -> List[Any]:
    return [r.get(key) for r in results]
