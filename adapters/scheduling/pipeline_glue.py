"""Everything that connects a step's ``pipeline_depth`` to InferencePipeline, in one place.

InferencePipeline decides once, at init, whether to run a workflow through its pipelined runner, by
asking each step *instance* ``can_activate_stream_pipeline()``. The instance is never given its manifest,
and the value lives in the manifest. The runtime's own order carries it across:

1. the Execution Engine parses every manifest, then builds and names each instance, on one thread; the
   manifest declares its step's depth here (:func:`declare_step_depth`, a per-thread table, so workflows
   compiled on other threads never see each other's steps);
2. the engine sets ``_workflow_step_name`` on the instance right after building it; the
   :class:`StreamPipelinedStep` mixin reads the declared depth at that moment;
3. InferencePipeline's queueing and future resolution switch on only when the process-wide variable
   ``RFDETR_PIPELINE_DEPTH`` is above 1, so a depth-2 step sets it when the pipeline asks (once, logged).
   A stock RF-DETR block in LOCAL mode in the same process then also reports itself pipelineable, and
   inference-models' TensorRT adapter loaded afterwards pipelines too. Our depth-1 steps stay synchronous.

A step with ``downstream_overlap`` declares that too; once InferencePipeline has asked (step 3), its runs
deliver the previous frame (``previous_frame.py``). Runs nobody pipelines (the HTTP server's requests)
always return their own frames.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence, Union

from inference_fastpath.adapters.scheduling.depth1 import SynchronousScheduler
from inference_fastpath.adapters.scheduling.depth2 import FutureScheduler
from inference_fastpath.adapters.scheduling.previous_frame import PreviousFrameDelivery

LOGGER = logging.getLogger("inference_fastpath")
PIPELINE_DEPTH_VARIABLE = "RFDETR_PIPELINE_DEPTH"
_declared = threading.local()


def declare_step_depth(step_name: str, depth: int, downstream_overlap: bool = False) -> None:
    registry = getattr(_declared, "depths", None)
    if registry is None:
        registry = _declared.depths = {}
    registry[step_name] = (int(depth), bool(downstream_overlap))


def declared_step_depth(step_name: str) -> int:
    return getattr(_declared, "depths", {}).get(step_name, (1, False))[0]


def declared_downstream_overlap(step_name: str) -> bool:
    return getattr(_declared, "depths", {}).get(step_name, (1, False))[1]


def runtime_pipelining_enabled() -> bool:
    try:
        return int(os.environ.get(PIPELINE_DEPTH_VARIABLE, "1").strip()) > 1
    except ValueError:
        return False


def enable_runtime_pipelining() -> None:
    if not runtime_pipelining_enabled():
        os.environ[PIPELINE_DEPTH_VARIABLE] = "2"
        LOGGER.warning(
            "A step runs with pipeline_depth=2: set %s=2 for this process so InferencePipeline resolves "
            "deferred results (stock RF-DETR blocks in this process see it too).",
            PIPELINE_DEPTH_VARIABLE,
        )


class StreamPipelinedStep:
    """The stream-pipelining hooks InferencePipeline asks a block instance for, the step's scheduler
    (depth 1: :class:`SynchronousScheduler`, depth 2: :class:`FutureScheduler`) and, with downstream
    overlap, its :class:`PreviousFrameDelivery`."""

    _declared_depth: int = 1
    _declared_overlap: bool = False
    _overlap_active: bool = False
    _step_scheduler: Optional[Union[SynchronousScheduler, FutureScheduler]] = None
    _previous_frame: Optional[PreviousFrameDelivery] = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "_workflow_step_name":  # step 2 of the module docstring
            super().__setattr__("_declared_depth", declared_step_depth(value))
            super().__setattr__("_declared_overlap", declared_downstream_overlap(value))

    def previous_frame_delivery(self, keys: Sequence[str], image_key: str) -> Optional[PreviousFrameDelivery]:
        """The step's delivery line when its runs deliver the previous frame, else None (see the module docstring)."""
        if not self._overlap_active:
            return None
        if self._previous_frame is None:
            self._previous_frame = PreviousFrameDelivery(keys, image_key)
        return self._previous_frame

    def scheduler(self, depth: int) -> Union[SynchronousScheduler, FutureScheduler]:
        """This step's scheduler for ``depth`` (a new one when the depth changes)."""
        current = self._step_scheduler
        if current is None or current.depth != depth:
            if current is not None:
                current.close()
            current = SynchronousScheduler() if depth <= 1 else FutureScheduler(depth)
            self._step_scheduler = current
        return current

    def is_stream_pipelined(self) -> bool:
        pipelined = self._declared_depth > 1
        if pipelined:
            enable_runtime_pipelining()  # before the first frame: the pipeline relies on it from now on
            if self._declared_overlap and not self._overlap_active:
                self._overlap_active = True
                LOGGER.info("step %s: downstream_overlap on: each run delivers the previous frame with its image",
                            getattr(self, "_workflow_step_name", "?"))
        return pipelined

    def can_activate_stream_pipeline(self) -> bool:
        return self.is_stream_pipelined()

    def stream_pipeline_depth(self) -> int:
        # Without overlap each run returns futures of its *own* frames: the runtime must not shift the
        # pairing. With it, run N's outputs belong to run N-1's frames.
        return 1 if self._overlap_active else 0

    def flush_stream_pipeline_outputs(self) -> list:
        # Without overlap nothing is held back between runs: every submitted frame already has its futures.
        return self._previous_frame.drain() if self._previous_frame is not None else []

    def close_stream_pipeline(self) -> None:
        if self._step_scheduler is not None:
            self._step_scheduler.close()  # finishes every submitted frame first
        if self._previous_frame is not None:
            dropped = self._previous_frame.discard()
            if dropped:
                LOGGER.warning("step %s: the pipeline closed without flushing; %d held frame(s) were not delivered",
                               getattr(self, "_workflow_step_name", "?"), dropped)

    def close(self) -> None:
        self.close_stream_pipeline()


def per_key_outputs(results: Sequence[Any], keys: Sequence[str]) -> List[Dict[str, Any]]:
    """Block outputs from a scheduler's results: a depth-2 frame's ``Future`` of its output dict
    becomes one ``Future`` per output key (what the Execution Engine resolves)."""
    return [{key: _select(result, key) for key in keys} if isinstance(result, Future) else result
            for result in results]


def _select(future: Future, key: str) -> Future:
    selected: Future = Future()

    def copy(done: Future) -> None:
        error = done.exception()
        if error is not None:
            selected.set_exception(error)
        else:
            selected.set_result(done.result()[key])

    future.add_done_callback(copy)
    return selected
