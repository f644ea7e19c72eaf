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
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from typing import Any, Dict, List, Optional, Sequence, Union

from inference_fastpath.adapters.scheduling.depth1 import SynchronousScheduler
from inference_fastpath.adapters.scheduling.depth2 import FutureScheduler

LOGGER = logging.getLogger("inference_fastpath")
PIPELINE_DEPTH_VARIABLE = "RFDETR_PIPELINE_DEPTH"
_declared = threading.local()


def declare_step_depth(step_name: str, depth: int) -> None:
    registry = getattr(_declared, "depths", None)
    if registry is None:
        registry = _declared.depths = {}
    registry[step_name] = int(depth)


def declared_step_depth(step_name: str) -> int:
    return getattr(_declared, "depths", {}).get(step_name, 1)


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
    """The stream-pipelining hooks InferencePipeline asks a block instance for, and the step's
    scheduler (depth 1: :class:`SynchronousScheduler`, depth 2: :class:`FutureScheduler`)."""

    _declared_depth: int = 1
    _step_scheduler: Optional[Union[SynchronousScheduler, FutureScheduler]] = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "_workflow_step_name":  # step 2 of the module docstring
            super().__setattr__("_declared_depth", declared_step_depth(value))

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
        return pipelined

    def can_activate_stream_pipeline(self) -> bool:
        return self.is_stream_pipelined()

    def stream_pipeline_depth(self) -> int:
        # Each run returns futures of its *own* frames, so the runtime must not shift the pairing.
        return 0

    def flush_stream_pipeline_outputs(self) -> list:
        return []  # nothing is held back between runs: every submitted frame already has its futures

    def close_stream_pipeline(self) -> None:
        if self._step_scheduler is not None:
            self._step_scheduler.close()  # finishes every submitted frame first

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
