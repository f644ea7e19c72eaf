"""Frames in page-locked (pinned) host memory: detection and a recycling pool.

A numpy frame in ordinary (pageable) memory reaches the GPU through a copy into a pinned staging
buffer and then a DMA; that copy runs on the pipeline's thread for every frame. A frame that already
lives in pinned memory skips it: the Triton preprocess stage sees that (``is_pinned_frame``) and sends
the frame by one async copy.

``pinned_video_source.py`` decodes video into frames from a :class:`PinnedFramePool`. A buffer is
reused only once nothing references its frame any more (``recycling.py``), so a frame kept by a sink, a queue or an
in-flight upload is never overwritten. Past the pinned-memory budget, or without CUDA, frames are
decoded into ordinary memory as before, with the reason logged once.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from inference_fastpath.adapters.cuda.recycling import is_unreferenced

LOGGER = logging.getLogger("inference_fastpath")

DEFAULT_PINNED_BUDGET_BYTES = 1 << 30  # ~170 1080p frames: a source buffer of 64 plus in-flight ones


def is_pinned_frame(frame: np.ndarray) -> bool:
    """Whether ``frame`` is a C-contiguous numpy array in page-locked memory (CUDA only).

    Costs a ``cudaPointerGetAttributes`` call (a few microseconds)."""
    if not (isinstance(frame, np.ndarray) and frame.flags.c_contiguous and frame.flags.writeable):
        return False
    if frame.size == 0:
        return False
    return bool(torch.from_numpy(frame).is_pinned())


class PinnedFramePool:
    """Recycled ``(height, width, 3)`` uint8 frames, pinned when CUDA is available.

    ``take`` returns an idle buffer of that shape, a new one while the budget allows, or
    ``None`` (the caller then decodes into memory of its own). Call it from one thread (the
    decoder's); frames may be released from any thread by dropping their references.
    ``pin``: ``None`` pins when CUDA is available; ``False`` recycles ordinary buffers. ``use`` names
    what the frames are for in the log line of a fallback (``"decoding"``, ``"painting"``)."""

    def __init__(self, budget_bytes: int = DEFAULT_PINNED_BUDGET_BYTES, pin: Optional[bool] = None,
                 use: str = "decoding") -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._frames: Dict[Tuple[int, int], List[np.ndarray]] = {}
        self.allocated_bytes = 0
        self.allocations = 0
        self.refusals = 0  # takes answered with None (budget spent, every buffer in use)
        self.fallback_reason: Optional[str] = None
        self._use = use  # what the frames are for, named in the fallback's log line

    def take(self, height: int, width: int) -> Optional[np.ndarray]:
        frames = self._frames.setdefault((height, width), [])
        for index in range(len(frames)):
            if is_unreferenced(frames, index):
                return frames[index]
        nbytes = height * width * 3
        if self.allocated_bytes + nbytes > self.budget_bytes:
            self._release_other_shapes((height, width))
        if self.allocated_bytes + nbytes > self.budget_bytes:
            self.refusals += 1
            self.fall_back(
                f"the {self.budget_bytes / 2**20:.0f} MiB budget is in use by {self.in_use()} frames"
            )
            return None
        try:
            frame = self._allocate(height, width)
        except RuntimeError as error:  # pinning refused by the driver (locked-memory limits)
            self.refusals += 1
            self.fall_back(f"allocation failed: {error}")
            return None
        frames.append(frame)
        self.allocated_bytes += nbytes
        self.allocations += 1
        return frame

    def in_use(self) -> int:
        return sum(not is_unreferenced(frames, i) for frames in self._frames.values() for i in range(len(frames)))

    def _allocate(self, height: int, width: int) -> np.ndarray:
        if not self.pin:
            return np.empty((height, width, 3), dtype=np.uint8)
        # the array keeps its tensor (and so the pinned block) alive through `.base`
        return torch.empty((height, width, 3), dtype=torch.uint8, pin_memory=True).numpy()

    def _release_other_shapes(self, keep: Tuple[int, int]) -> None:
        """A source that changed resolution: drop the idle buffers of the old shapes."""
        for shape, frames in self._frames.items():
            if shape == keep:
                continue
            for index in reversed(range(len(frames))):
                if is_unreferenced(frames, index):
                    self.allocated_bytes -= frames[index].nbytes
                    del frames[index]

    def fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            LOGGER.warning("pinned frames: %s into ordinary memory for now: %s", self._use, reason)


__all__ = [
    "DEFAULT_PINNED_BUDGET_BYTES",
    "PinnedFramePool",
    "is_pinned_frame",
]
