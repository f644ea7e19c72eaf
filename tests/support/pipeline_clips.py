"""Short clips for the tests that run InferencePipeline, and the check that no scheduler thread outlives it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict

from inference_fastpath.adapters.scheduling.depth2 import WORKER_THREAD_PREFIX
from inference_fastpath.workflows.video_files import read_frames, write_clip


def no_worker_threads() -> bool:
    """Whether every depth-2 worker thread has ended."""
    return not [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)]


def short_clips(directory: Path, clip_path: str) -> Dict[int, str]:
    """Clips of 1, 2 and 4 frames (every 20th frame of ``clip_path``), by frame count."""
    frames = read_frames(clip_path, count=4, step=20)
    return {n: str(write_clip(directory / f"clip{n}.mp4", frames[:n])) for n in (1, 2, 4)}
