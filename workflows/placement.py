"""Spreading pipelines over a host's GPUs: the ``device`` option of our steps, set per pipeline.

The inference server's stream manager runs one process per pipeline and has no placement of its own:
every pipeline process sees the same GPUs. A client that starts pipelines through
``POST /inference_pipelines/initialise`` spreads them by writing a ``device`` into each pipeline's
workflow specification, here round-robin.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List

FASTPATH_BLOCK_TYPES = ("fastpath/rfdetr_instance_segmentation@v1", "fastpath/mask_visualization@v1")


def round_robin_devices(pipelines: int, gpus: int) -> List[str]:
    """The device of each of ``pipelines`` pipelines over ``gpus`` GPUs.

    Example:
        >>> round_robin_devices(5, 2)
        ['cuda:0', 'cuda:1', 'cuda:0', 'cuda:1', 'cuda:0']
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    return [f"cuda:{index % gpus}" for index in range(pipelines)]


def on_device(workflow: Dict[str, Any], device: str) -> Dict[str, Any]:
    """A copy of ``workflow`` whose every fastpath step (segmentation, mask visualization) runs on ``device``.

    Example:
        >>> spec = {"steps": [{"type": "fastpath/rfdetr_instance_segmentation@v1", "name": "s"}]}
        >>> on_device(spec, "cuda:1")["steps"][0]["device"]
        'cuda:1'
    """
    placed = copy.deepcopy(workflow)
    steps = [step for step in placed.get("steps", []) if step.get("type") in FASTPATH_BLOCK_TYPES]
    if not steps:
        raise ValueError("the workflow has no fastpath step to place")
    for step in steps:
        step["device"] = device
    return placed
