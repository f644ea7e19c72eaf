"""Reusable host buffers for the dense ``(N, H, W)`` bool masks the postprocess hands out.

A fresh multi-megabyte array per frame costs its page faults on first write, several times the
paste itself into memory already mapped. The pool hands out views of a few long-lived buffers instead and takes a buffer back only
once nothing references it any more - no view, no ``sv.Detections`` still holding its masks - which
CPython's reference count tells exactly. A caller keeping every frame's masks simply makes the
pool allocate, as before.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from inference_fastpath.adapters.cuda.recycling import is_unreferenced


class MaskBufferPool:
    """Hands out zeroed ``(n, height, width)`` bool arrays backed by recycled buffers.

    Not thread-safe: one pool per postprocess stage (its calls are serialised)."""

    def __init__(self, buffers_per_size: int = 6) -> None:
        self.buffers_per_size = int(buffers_per_size)
        self._buffers: Dict[Tuple[int, int], List[np.ndarray]] = {}
        self.allocations = 0  # buffers allocated so far (tests and diagnostics)

    def take(self, n: int, height: int, width: int) -> np.ndarray:
        """A zeroed ``(n, height, width)`` bool view the caller may give away."""
        buffers = self._buffers.setdefault((height, width), [])
        idle = [i for i in range(len(buffers)) if is_unreferenced(buffers, i)]
        for i in idle:
            if buffers[i].shape[0] >= n:
                view = buffers[i][:n]
                view.fill(False)  # resident memory: a memset, no page faults
                return view
        capacity = max(8, -(-n // 8) * 8)  # room for a few more masks before a regrowth
        base = np.zeros((capacity, height, width), dtype=bool)
        self.allocations += 1
        if len(buffers) >= self.buffers_per_size and idle:
            del buffers[min(idle, key=lambda i: buffers[i].shape[0])]  # the smallest idle one
        if len(buffers) < self.buffers_per_size:
            buffers.append(base)
        return base[:n]
