"""An ONNX package of the demo model runs through the block (engine=onnx) like the torch package."""

from __future__ import annotations

import pytest

from inference_fastpath.workflows.comparison import compare_detections
from inference_fastpath.workflows.running import execution_engine
from inference_fastpath.workflows import FASTPATH, load_workflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onnx_package(tmp_path_factory, demo_model_dir):
    pytest.importorskip("onnxruntime")
    from inference_fastpath.examples.onnx_package import build_onnx_package

    return str(build_onnx_package(demo_model_dir, tmp_path_factory.mktemp("onnx") / "pkg"))


def test_onnx_package_gives_the_torch_package_detections(onnx_package, demo_model_dir, clip_frames):
    from inference_fastpath.adapters.runner import RUNNERS

    onnx_engine = execution_engine(load_workflow(FASTPATH, engine="onnx", preprocess="reference", postprocess="reference"))
    torch_engine = execution_engine(load_workflow(FASTPATH, engine="torch", preprocess="reference", postprocess="reference"))
    for frame in clip_frames[:2]:
        ours = onnx_engine.run(runtime_parameters={"image": [frame], "model_id": onnx_package})[0]["predictions"]
        base = torch_engine.run(runtime_parameters={"image": [frame], "model_id": demo_model_dir})[0]["predictions"]
        report = compare_detections(ours, base)
        assert report.within(confidence=1e-4, box_px=1.0, mask_iou=0.999), report
    backends = {key[0].backend: runner for key, runner in RUNNERS._runners.items()}
    assert backends["onnx"].loaded.backend == "onnx"
    assert [c.selected for c in backends["onnx"].choices if c.stage == "engine"] == ["onnx"]
