"""When a pooled buffer may be handed out again: once nothing outside its pool references it.

CPython's reference count tells that exactly: views of the buffer, tensors made from it
(``torch.from_numpy``), ``sv.Detections`` holding it, queues and sinks all hold a reference. Both
buffer pools use this rule: dense masks (``stages/mask_buffers.py``) and pinned frames
(``pinned_frames.py``).
"""

from __future__ import annotations

import sys
from typing import List

import numpy as np

# References to an idle buffer while `is_unreferenced` looks at it: the pool's list and
# getrefcount's own argument (the buffer is read straight from the list: no local name holds it).
_IDLE_REFERENCES = 2


def is_unreferenced(buffers: List[np.ndarray], index: int) -> bool:
    """Whether ``buffers[index]`` is referenced by nothing but the pool's list ``buffers``."""
    return sys.getrefcount(buffers[index]) <= _IDLE_REFERENCES


__all__ = ["is_unreferenced"]
