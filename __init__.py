"""inference-fastpath: RF-DETR instance segmentation blocks for Roboflow Workflows.

Load it with ``WORKFLOWS_PLUGINS=inference_fastpath``. The Workflows runtime reads
``load_blocks()`` and ``REGISTERED_INITIALIZERS`` from this module.
"""

from typing import List, Type

__version__ = "0.1.0"


def load_blocks() -> List[Type]:
    from inference_fastpath.blocks import load_blocks as _load_blocks

    return _load_blocks()


def _api_key_from_environment():
    import os

    return os.getenv("ROBOFLOW_API_KEY") or os.getenv("API_KEY")


# `InferencePipeline` and the HTTP server only hand `workflows_core.*` init parameters to blocks;
# our block therefore resolves its own (see README "How the plugin loads").
REGISTERED_INITIALIZERS = {"api_key": _api_key_from_environment}
