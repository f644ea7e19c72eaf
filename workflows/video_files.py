"""Small video helpers shared by the examples, the benchmark and the tests."""

from __future__ import annotations

from pathlib import Path
from typing import List, Union

import cv2
import numpy as np


def read_frames(path: Union[str, Path], count: int, step: int = 1) -> List[np.ndarray]:
    """Up to `count` frames of the video, taking every `step`-th one."""
    capture = cv2.VideoCapture(str(path))
    frames: List[np.ndarray] = []
    index = 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(frame)
        index += 1
    capture.release()
    return frames


def write_clip(path: Union[str, Path], frames: List[np.ndarray], fps: float = 25.0) -> Path:
    """Encodes frames as an mp4v video that OpenCV reads back on any machine."""
    if not frames:
        raise ValueError("write_clip needs at least one frame")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return Path(path)


def video_fps(path: Union[str, Path], default: float = 25.0) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or default
    capture.release()
    return fps
