"""Shared test setup: the environment the Workflows runtime reads at import, the demo model, the clip."""

from __future__ import annotations

import os

# Read by `inference` at import time: load our plugin, allow local packages, keep the runtime offline.
os.environ.setdefault("WORKFLOWS_PLUGINS", "inference_fastpath")
os.environ.setdefault("ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES", "True")
os.environ.setdefault("DISABLE_VERSION_CHECK", "True")
os.environ.setdefault("METRICS_ENABLED", "False")
os.environ.setdefault("ACTIVE_LEARNING_ENABLED", "False")
os.environ.setdefault("CORE_MODEL_GAZE_ENABLED", "False")

from pathlib import Path  # noqa: E402
from typing import List  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from inference_fastpath.examples.video_io import read_frames, write_clip  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def clip_path() -> Path:
    from inference_fastpath.examples.demo_model import default_clip_path

    return default_clip_path()


@pytest.fixture(scope="session")
def demo_model_dir(clip_path) -> str:
    from inference_fastpath.examples.demo_model import build_demo_model

    return str(build_demo_model(clip_path=clip_path))


@pytest.fixture(scope="session")
def clip_frames(clip_path) -> List[np.ndarray]:
    return read_frames(clip_path, count=4, step=15)


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory, clip_path) -> Path:
    """A few frames of the bundled clip, re-encoded, so pipeline tests stay fast on 2 CPU cores."""
    frames = read_frames(clip_path, count=5, step=10)
    return write_clip(tmp_path_factory.mktemp("clips") / "short.mp4", frames)
