"""Glue between our depth-2 steps and InferencePipeline's stream-pipelining contract.

InferencePipeline decides once, at init, whether to run a workflow through its pipelined runner, by
asking each step instance ``can_activate_stream_pipeline()``. The instance is never given its manifest,
but manifests are parsed (on the same thread) just before the instances are built and named, so each
manifest declares its step's depth here and the instance reads it when the engine names it.

The runtime's queueing and future resolution only switch on when the process-wide environment variable
``RFDETR_PIPELINE_DEPTH`` is above 1; a depth-2 step sets it (once, logged). Effect on other blocks: a
stock RF-DETR block in LOCAL mode in the same process then also reports itself pipelineable, and
inference-models' TensorRT adapter loaded afterwards pipelines too. Depth-1 steps of ours stay
synchronous either way.
"""

from __future__ import annotations

import logging
import os
import threading

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
