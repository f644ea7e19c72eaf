"""Validates frames before they enter the stages, so a bad frame fails with a message that names it.

Grayscale and BGRA frames are converted to BGR (as the stock path's image loader does) and the
conversion is logged once; empty frames, non-uint8 data and odd channel counts raise
``InvalidFrameError``.
"""

from __future__ import annotations

import logging
from typing import Any, List, Sequence, Set, Tuple

import cv2
import numpy as np
import torch

from inference_fastpath.adapters.contracts import Frame

LOGGER = logging.getLogger("inference_fastpath")
_CONVERSIONS_LOGGED: set = set()


class InvalidFrameError(ValueError):
    """A frame the model cannot run on; the message names the frame index and its shape/dtype."""


def _log_conversion_once(kind: str) -> None:
    if kind not in _CONVERSIONS_LOGGED:
        _CONVERSIONS_LOGGED.add(kind)
        LOGGER.warning("Converting %s frames to 3-channel BGR before inference.", kind)


def normalise_frame(frame: Frame, index: int = 0) -> Frame:
    if frame is None:
        raise InvalidFrameError(f"images[{index}]: frame is None.")
    if isinstance(frame, torch.Tensor):
        if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.numel() == 0:
            raise InvalidFrameError(
                f"images[{index}]: tensor frames must be non-empty uint8 HWC with 3 channels, got "
                f"shape {tuple(frame.shape)} dtype {frame.dtype}."
            )
        return frame
    if not isinstance(frame, np.ndarray):
        raise InvalidFrameError(f"images[{index}]: expected a numpy array or torch tensor, got {type(frame).__name__}.")
    if frame.size == 0 or frame.ndim < 2 or 0 in frame.shape[:2]:
        raise InvalidFrameError(f"images[{index}]: frame is empty (shape {frame.shape}).")
    if frame.dtype != np.uint8:
        raise InvalidFrameError(f"images[{index}]: expected uint8 pixels, got dtype {frame.dtype} (shape {frame.shape}).")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        _log_conversion_once("grayscale")
        return cv2.cvtColor(frame.reshape(frame.shape[0], frame.shape[1]), cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        _log_conversion_once("4-channel (BGRA)")
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidFrameError(
            f"images[{index}]: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {frame.shape}."
        )
    return frame


def split_valid_frames(images: Sequence[Any], step_name: str = "") -> Tuple[List[Frame], Set[int]]:
    """The frames of a step's images that the model can run on, and the indexes of those it cannot.

    A bad frame must not stop a video stream (an exception would end InferencePipeline's inference
    thread), so it is left out with an error log naming the frame and its source.
    """
    frames, invalid = [], set()
    for index, image in enumerate(images):
        try:
            frames.append(normalise_frame(image.numpy_image, index))
        except InvalidFrameError as error:
            video = getattr(image, "video_metadata", None)
            LOGGER.error(
                "step %s: skipping frame %s of source %s: %s", step_name or "?",
                getattr(video, "frame_number", "?"), getattr(video, "video_identifier", "?"), error,
            )
            invalid.add(index)
    return frames, invalid
