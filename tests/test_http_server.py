"""The real inference HTTP server (uvicorn on 127.0.0.1) with our plugin: describe, run, bad requests."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest

from inference_fastpath.workflows.running import LOCAL_PACKAGES_OPT_IN, RUNTIME_ENVIRONMENT, execution_engine
from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

from support.http_server import image_input, run_workflow, running_server

BLOCK_TYPE = "fastpath/rfdetr_instance_segmentation@v1"
REFERENCE = dict(preprocess="reference", postprocess="reference")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    environment = {**os.environ, **RUNTIME_ENVIRONMENT, **LOCAL_PACKAGES_OPT_IN}  # the test is the operator
    with running_server(environment, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def described(server):
    response = httpx.post(f"{server}/workflows/blocks/describe", json={}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    blocks = [b for b in response.json()["blocks"] if b["manifest_type_identifier"] == BLOCK_TYPE]
    assert len(blocks) == 1
    return blocks[0]


def test_describe_lists_every_option_as_the_builder_renders_it(described):
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BlockManifest

    served = described["block_schema"]["properties"]
    local = BlockManifest.model_json_schema()["properties"]
    for name in ("preprocess", "engine", "cuda_graphs", "precision", "postprocess", "pipeline_depth", "mask_output"):
        for key in ("default", "description", "title", "values_metadata", "relevant_for", "additional_section"):
            assert served[name].get(key) == local[name].get(key), (name, key)
    assert served["engine"]["values_metadata"]["tensorrt"]["name"] == "TensorRT"
    assert served["pipeline_depth"]["default"] == 1 and served["cuda_graphs"]["default"] is True
    assert described["human_friendly_block_name"] == "RF-DETR Instance Segmentation (Fastpath)"


@pytest.mark.slow
def test_run_over_http_matches_the_block_in_process(server, demo_model_dir, clip_frames):
    frame = clip_frames[0]
    workflow = load_workflow(FASTPATH, **REFERENCE)
    response = run_workflow(server, workflow, {"image": image_input(frame), "model_id": demo_model_dir})
    assert response.status_code == 200, response.text[:1000]
    served = response.json()["outputs"][0]["predictions"]["predictions"]
    local = execution_engine(workflow).run(runtime_parameters={"image": [frame], "model_id": demo_model_dir})[0]
    local = local["predictions"]
    assert len(served) == len(local) > 0
    for served_detection, xyxy, confidence, class_name in zip(
        served, local.xyxy, local.confidence, local.data["class_name"]
    ):
        x, y, w, h = (served_detection[k] for k in ("x", "y", "width", "height"))
        assert np.allclose([x - w / 2, y - h / 2, x + w / 2, y + h / 2], xyxy, atol=1e-3)
        assert abs(served_detection["confidence"] - confidence) < 1e-5
        assert served_detection["class"] == class_name
        assert len(served_detection["points"]) >= 3

    rle_workflow = load_workflow(FASTPATH, mask_output="rle", **REFERENCE)
    response = run_workflow(server, rle_workflow, {"image": image_input(frame), "model_id": demo_model_dir})
    assert response.status_code == 200, response.text[:1000]
    rle = response.json()["outputs"][0]["predictions"]["predictions"]
    assert len(rle) == len(local)
    from pycocotools import mask as mask_utils

    for served_detection, dense in zip(rle, local.mask):
        encoded = served_detection["rle_mask"]
        decoded = mask_utils.decode({"size": encoded["size"], "counts": encoded["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), dense)


@pytest.mark.slow
def test_selector_switches_an_option_at_run_time(server, demo_model_dir, clip_frames):
    workflow = load_workflow(FASTPATH, preprocess="$inputs.preprocess", postprocess="reference")
    workflow["inputs"].append({"type": "WorkflowParameter", "name": "preprocess", "default_value": "auto"})
    image = image_input(clip_frames[0])
    ok = run_workflow(server, workflow, {"image": image, "model_id": demo_model_dir, "preprocess": "reference"})
    assert ok.status_code == 200, ok.text[:500]
    bad = run_workflow(server, workflow, {"image": image, "model_id": demo_model_dir, "preprocess": "cuda-magic"})
    # The server checks the run-time value against the manifest before the block runs.
    assert bad.status_code == 400 and "property preprocess" in bad.text


def test_bad_requests_get_4xx_naming_the_field(server, tmp_path):
    image = image_input(np.zeros((16, 16, 3), np.uint8))
    invalid_value = run_workflow(server, load_workflow(FASTPATH, engine="tensorrtx"), {"image": image, "model_id": "x"})
    assert invalid_value.status_code == 400 and "engine" in invalid_value.text

    wrong_kind = load_workflow(FASTPATH)
    wrong_kind["steps"][0]["images"] = "$inputs.model_id"
    response = run_workflow(server, wrong_kind, {"image": image, "model_id": "x"})
    assert response.status_code == 400 and "images" in response.text

    missing = run_workflow(server, load_workflow(FASTPATH), {"image": image, "model_id": str(tmp_path / "nope")})
    assert missing.status_code == 404 and "nope" in missing.text

    depth_selector = load_workflow(FASTPATH, pipeline_depth="$inputs.depth")
    response = run_workflow(server, depth_selector, {"image": image, "model_id": "x"})
    assert response.status_code == 400 and "fixed when the workflow is compiled" in response.text


@pytest.mark.slow
def test_with_the_operator_opt_in_both_blocks_load_the_same_local_package(server, demo_model_dir, clip_frames):
    image = image_input(clip_frames[0])
    ours = run_workflow(server, load_workflow(FASTPATH, **REFERENCE), {"image": image, "model_id": demo_model_dir})
    stock = run_workflow(server, load_workflow(STOCK_V3), {"image": image, "model_id": demo_model_dir})
    assert ours.status_code == stock.status_code == 200, (ours.text[:300], stock.text[:300])
    ours_predictions = ours.json()["outputs"][0]["predictions"]["predictions"]
    stock_predictions = stock.json()["outputs"][0]["predictions"]["predictions"]
    assert len(ours_predictions) == len(stock_predictions) > 0
    for a, b in zip(ours_predictions, stock_predictions):
        assert a["class"] == b["class"] and abs(a["confidence"] - b["confidence"]) < 1e-5
        assert all(abs(a[k] - b[k]) <= 1.0 for k in ("x", "y", "width", "height"))
