"""inference-fastpath: RF-DETR instance segmentation blocks for Roboflow Workflows.

Load it with ``WORKFLOWS_PLUGINS=inference_fastpath``. The Workflows runtime reads ``load_blocks()``
from this module; the block takes the request's API key from the runtime (``workflows_core.api_key``),
as the stock model blocks do.
"""

from typing import List, Type

__version__ = "0.1.0"


def load_blocks() -> List[Type]:
    from inference_fastpath.blocks import load_blocks as _load_blocks

    return _load_blocks()
