"""Bad input gets a clear error naming it, and the engine / pipeline keeps working."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from inference_fastpath.workflows.running import execution_engine, run_pipeline
from inference_fastpath.workflows import FASTPATH, load_workflow

REFERENCE = dict(preprocess="reference", postprocess="reference")


def _error_text(excinfo) -> str:
    error, parts = excinfo.value, []
    while error is not None:
        parts.append(str(error))
        parts.append(str(getattr(error, "public_message", "")))
        error = error.__cause__ or getattr(error, "inner_error", None)
    return " | ".join(parts)


def test_invalid_option_value_is_rejected_at_compile_time_naming_the_field():
    from inference.core.workflows.errors import WorkflowDefinitionError, WorkflowError

    with pytest.raises((WorkflowDefinitionError, WorkflowError)) as excinfo:
        execution_engine(load_workflow(FASTPATH, engine="tensorrtx"))
    text = _error_text(excinfo)
    assert "rfdetr_instance_segmentation@v1.engine" in text
    assert "'auto', 'tensorrt', 'torch' or 'onnx'" in text


def test_unknown_model_path_names_the_path(tmp_path):
    engine = execution_engine(load_workflow(FASTPATH))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(Exception) as excinfo:
        engine.run(runtime_parameters={"image": [np.zeros((8, 8, 3), np.uint8)], "model_id": missing})
    assert missing in _error_text(excinfo) and "no model package directory" in _error_text(excinfo)


def test_directory_that_is_not_a_package_is_named(tmp_path):
    engine = execution_engine(load_workflow(FASTPATH))
    with pytest.raises(Exception) as excinfo:
        engine.run(runtime_parameters={"image": [np.zeros((8, 8, 3), np.uint8)], "model_id": str(tmp_path)})
    assert "model_config.json" in _error_text(excinfo)


@pytest.mark.slow
def test_wrong_package_kind_is_named(tmp_path, demo_model_dir):
    wrong = tmp_path / "detection-package"
    shutil.copytree(demo_model_dir, wrong)
    config = json.loads((wrong / "model_config.json").read_text())
    config["task_type"] = "object-detection"
    (wrong / "model_config.json").write_text(json.dumps(config))
    engine = execution_engine(load_workflow(FASTPATH))
    with pytest.raises(Exception) as excinfo:
        engine.run(runtime_parameters={"image": [np.zeros((32, 32, 3), np.uint8)], "model_id": str(wrong)})
    text = _error_text(excinfo)
    assert str(wrong) in text or "detection-package" in text
    assert "instance-segmentation" in text or "RFDetrForObjectDetection" in text or "Could not load" in text


@pytest.mark.slow
def test_odd_frames_in_one_batch_do_not_stop_the_others(demo_model_dir, clip_frames, caplog):
    good = clip_frames[0]
    frames = {
        "good": good,
        "grayscale": good[:, :, 0].copy(),
        "bgra": np.dstack([good, np.full(good.shape[:2], 255, np.uint8)]),
        "one_pixel": good[:1, :1].copy(),
        "empty": np.zeros((0, 0, 3), np.uint8),
    }
    engine = execution_engine(load_workflow(FASTPATH, **REFERENCE))
    with caplog.at_level(logging.WARNING, logger="inference_fastpath"):
        results = engine.run(runtime_parameters={"image": list(frames.values()), "model_id": demo_model_dir})
    by_name = {name: r["predictions"] for name, r in zip(frames, results)}
    assert len(by_name["good"]) > 0
    assert len(by_name["one_pixel"]) >= 0 and by_name["one_pixel"].mask.shape[1:] == (1, 1)
    assert len(by_name["bgra"]) == len(by_name["good"])  # alpha dropped: same pixels
    assert len(by_name["empty"]) == 0
    assert by_name["grayscale"].mask.shape[1:] == good.shape[:2]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "frame is empty" in messages and "grayscale" in messages


@pytest.mark.slow
def test_pipeline_with_unknown_model_reports_the_error_and_ends_cleanly(short_clip, tmp_path):
    run = run_pipeline(str(short_clip), load_workflow(FASTPATH), {"model_id": str(tmp_path / "missing")})
    assert run.results == []
    assert run.errors and "missing" in run.errors[0]["error_message"]


@pytest.mark.parametrize(
    "inputs, named",
    [({"max_detections": -1}, "max_detections"), ({"max_detections": 0}, "max_detections"),
     ({"max_detections": True}, "max_detections"), ({"per_class_confidence": {"alpha": "abc"}}, "per_class_confidence"),
     ({"class_filter": "alpha"}, "class_filter")],
)
def test_direct_run_validates_inputs_naming_the_field(demo_model_dir, inputs, named):
    """Called outside the workflow engine, the block checks what the manifest would have checked."""
    from inference.core.workflows.errors import ClientCausedStepExecutionError
    from inference.core.workflows.execution_engine.entities.base import ImageParentMetadata, WorkflowImageData

    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import RFDetrInstanceSegmentationBlockV1

    image = WorkflowImageData(parent_metadata=ImageParentMetadata(parent_id="p"),
                              numpy_image=np.zeros((16, 16, 3), np.uint8))
    block = RFDetrInstanceSegmentationBlockV1()
    with pytest.raises(ClientCausedStepExecutionError) as excinfo:
        block.run(images=[image], model_id=demo_model_dir, **REFERENCE, **inputs)
    assert f"`{named}" in excinfo.value.public_message
