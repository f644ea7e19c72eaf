"""The trained demo model built from the committed parameters (CPU): it segments the shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_fastpath.examples import trained_demo
from inference_fastpath.examples.training import evaluate_demo_model as ev
from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES


@pytest.fixture(scope="module")
def trained_package(tmp_path_factory) -> Path:
    return trained_demo.build_trained_demo_model(tmp_path_factory.mktemp("trained") / "package")


def test_committed_parameters_fit_the_size_limit():
    from inference_fastpath.examples.training.trained_params import params_files, read_params_metadata

    files = params_files(trained_demo.TRAINED_PARAMS)
    assert len(files) == 2 and all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) <= 20_000_000
    metadata = read_params_metadata(trained_demo.TRAINED_PARAMS)
    assert metadata["scene_class_names"] == list(CLASS_NAMES) and metadata["classification"] == "ia_bce"


def test_trained_package_is_cached_and_rebuilt_when_its_stamp_differs(trained_package):
    weights = trained_package / "weights.pth"
    built_at = weights.stat().st_mtime_ns
    assert trained_demo.build_trained_demo_model(trained_package) == trained_package
    assert weights.stat().st_mtime_ns == built_at
    (trained_package / trained_demo.STAMP_FILE).write_text("{}")
    trained_demo.build_trained_demo_model(trained_package)
    assert weights.stat().st_mtime_ns != built_at


def test_trained_model_segments_the_shapes_clip(trained_package):
    """Through inference-models' own pre/forward/post on the CPU, against the clip's exact ground
    truth: the bars are below the held-out figures measured on the GPU host (the frames here are
    few and decoded from H.264), far above what a random network reaches (no detections)."""
    model = ev.load_package(trained_package, torch.device("cpu"))
    frames = ev.clip_frames(trained_demo.default_video_path())[::10]
    result = ev.evaluate_package(model, CLASS_NAMES, batch=4, confidence=trained_demo.CONFIDENCE, frames=frames)
    assert result["frames"] == 12 and result["gt_objects"] > 30
    assert result["mean_matched_iou"] >= 0.6, ev.format_table(result)
    assert result["recall"] >= 0.5, ev.format_table(result)


def test_missing_parameters_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        trained_demo.build_trained_demo_model(tmp_path / "p", params=tmp_path / "nowhere.safetensors")
