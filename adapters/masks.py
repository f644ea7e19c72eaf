"""Host-side mask helpers shared by the stages and the block output."""

from __future__ import annotations

import cv2
import numpy as np


def largest_external_contour(mask: np.ndarray) -> np.ndarray:
    """The external contour with the most points (``CHAIN_APPROX_SIMPLE``), as (K, 2) float32.

    This is what the stock inference server sends as a detection's polygon; empty masks give (0, 2).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), dtype=np.float32)
    longest = max(contours, key=len)
    return longest.reshape(-1, 2).astype(np.float32)
