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

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # `support.*`: the helpers the tests share
from typing import List  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from inference_fastpath.workflows.video_files import read_frames, write_clip  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def clip_path() -> Path:
    return REPOSITORY / "examples" / "data" / "clip.mp4"


@pytest.fixture(scope="session")
def demo_model_dir(clip_path) -> str:
    """The demo package, built (or found in the user cache) by the example, run as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "inference_fastpath.examples.demo_model", "--clip", str(clip_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[0].strip()


@pytest.fixture(scope="session")
def clip_frames(clip_path) -> List[np.ndarray]:
    return read_frames(clip_path, count=4, step=15)


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory, clip_path) -> Path:
    """A few frames of the bundled clip, re-encoded, so pipeline tests stay fast on 2 CPU cores."""
    frames = read_frames(clip_path, count=5, step=10)
    return write_clip(tmp_path_factory.mktemp("clips") / "short.mp4", frames)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, clip_path) -> str:
    """Three frames of the bundled clip: the examples' end-to-end runs on the CPU."""
    return str(write_clip(tmp_path_factory.mktemp("tiny") / "tiny.mp4", read_frames(clip_path, count=3, step=30)))


@pytest.fixture(scope="session")
def tiny_onnx_bytes():
    """Factory: a tiny ONNX graph with RF-DETR's I/O, (N,3,8,8) -> dets (N,5,4), labels (N,5,3),
    masks (N,5,2,2); `static_batch` fixes N. Used by the CPU and GPU engine tests."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def build(static_batch=None) -> bytes:
        rng = np.random.default_rng(0)
        batch = static_batch if static_batch is not None else "N"
        inits = [
            numpy_helper.from_array(rng.standard_normal((3, 20)).astype(np.float32), "w_box"),
            numpy_helper.from_array(rng.standard_normal((3, 15)).astype(np.float32), "w_cls"),
            numpy_helper.from_array(np.array([-1, 5, 4], dtype=np.int64), "shape_box"),
            numpy_helper.from_array(np.array([-1, 5, 3], dtype=np.int64), "shape_cls"),
            numpy_helper.from_array(np.arange(1, 6, dtype=np.float32).reshape(1, 5, 1, 1), "q_scale"),
        ]
        nodes = [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w_box"], ["box_flat"]),
            helper.make_node("Reshape", ["box_flat", "shape_box"], ["dets"]),
            helper.make_node("MatMul", ["flat", "w_cls"], ["cls_flat"]),
            helper.make_node("Reshape", ["cls_flat", "shape_cls"], ["labels"]),
            helper.make_node("AveragePool", ["input"], ["small"], kernel_shape=[4, 4], strides=[4, 4]),
            helper.make_node("ReduceMean", ["small"], ["chan"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["chan", "q_scale"], ["masks"]),
        ]
        graph = helper.make_graph(
            nodes,
            "tiny_rfdetr_io",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
            [
                helper.make_tensor_value_info("dets", TensorProto.FLOAT, [batch, 5, 4]),
                helper.make_tensor_value_info("labels", TensorProto.FLOAT, [batch, 5, 3]),
                helper.make_tensor_value_info("masks", TensorProto.FLOAT, [batch, 5, 2, 2]),
            ],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model.SerializeToString()

    return build


@pytest.fixture(scope="session")
def seg_model():
    """One randomly initialised rfdetr-seg-nano for the engine tests (building it costs seconds on a CPU)."""
    from inference_fastpath.adapters.engine.torch_engine import build_random_model

    return build_random_model("rfdetr-seg-nano", device="cpu", seed=0)
