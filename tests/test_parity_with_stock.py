"""Our block on the reference stages gives the stock v3 block's detections, frame by frame.

Masks: the stock block sends polygons through the inference response and rasterises them again,
which drops extra components and holes. Our block keeps inference-models' dense masks, so we check
(a) our masks equal inference-models' own dense masks exactly and (b) they equal the stock masks
(IoU >= 0.999) once passed through that same polygon step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from supervision.detection.compact_mask import CompactMask

from inference_fastpath.workflows.comparison import compare_detections, mask_iou
from inference_fastpath.workflows.running import execution_engine, run_pipeline
from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

pytestmark = pytest.mark.slow
REFERENCE = dict(preprocess="reference", engine="auto", postprocess="reference", pipeline_depth=1)


def _assert_matches_stock(ours, stock):
    report = compare_detections(ours, stock, polygonise_a=True)
    assert report.within(confidence=1e-5, box_px=1.0, mask_iou=0.999), report
    assert len(ours) > 0


@pytest.fixture(scope="module")
def engines():
    return execution_engine(load_workflow(FASTPATH, **REFERENCE)), execution_engine(load_workflow(STOCK_V3))


def test_execution_engine_matches_stock_block(engines, demo_model_dir, clip_frames):
    ours_engine, stock_engine = engines
    for frame in clip_frames:
        params = {"image": [frame], "model_id": demo_model_dir}
        ours = ours_engine.run(runtime_parameters=params)[0]["predictions"]
        stock = stock_engine.run(runtime_parameters=params)[0]["predictions"]
        _assert_matches_stock(ours, stock)
        assert set(ours.data) >= set(stock.data)
        assert ours.data["prediction_type"].tolist() == stock.data["prediction_type"].tolist()
        assert ours.data["class_name"].tolist() == stock.data["class_name"].tolist()


def test_dense_masks_are_exactly_inference_models_masks(engines, demo_model_dir, clip_frames):
    from inference_models import AutoModel

    model = AutoModel.from_pretrained(demo_model_dir, device=torch.device("cpu"))
    ours_engine, _ = engines
    frame = clip_frames[0]
    reference = model(frame, input_color_format="bgr")[0]
    ours = ours_engine.run(runtime_parameters={"image": [frame], "model_id": demo_model_dir})[0]["predictions"]
    assert len(ours) == len(reference.xyxy)
    np.testing.assert_array_equal(ours.xyxy, reference.xyxy.numpy())
    np.testing.assert_array_equal(ours.class_id, reference.class_id.numpy())
    np.testing.assert_allclose(ours.confidence, reference.confidence.numpy(), atol=1e-7)
    assert all(mask_iou(a, b) == 1.0 for a, b in zip(ours.mask, reference.mask.numpy()))


def test_inference_pipeline_matches_stock_block(demo_model_dir, short_clip):
    params = {"model_id": demo_model_dir}
    ours = run_pipeline(str(short_clip), load_workflow(FASTPATH, **REFERENCE), params)
    stock = run_pipeline(str(short_clip), load_workflow(STOCK_V3), params)
    assert not ours.errors and not stock.errors
    assert ours.frame_ids == stock.frame_ids == sorted(set(ours.frame_ids))
    assert len(ours.frame_ids) == 5
    for a, b in zip(ours.results, stock.results):
        _assert_matches_stock(a["predictions"], b["predictions"])


def test_rle_output_decodes_to_the_dense_masks(demo_model_dir, clip_frames):
    from pycocotools import mask as mask_utils

    frame = clip_frames[1]
    params = {"image": [frame], "model_id": demo_model_dir}
    dense = execution_engine(load_workflow(FASTPATH, mask_output="dense", **REFERENCE)).run(
        runtime_parameters=params)[0]["predictions"]
    rle = execution_engine(load_workflow(FASTPATH, mask_output="rle", **REFERENCE)).run(runtime_parameters=params)[0][
        "predictions"
    ]
    assert isinstance(rle.mask, CompactMask) and len(rle) == len(dense) > 0
    np.testing.assert_array_equal(rle.mask.to_dense(), dense.mask)  # the same masks, carried compact
    assert set(rle.data["prediction_type"]) == {"rle-instance-segmentation"}
    decoded = np.stack([mask_utils.decode(m) for m in rle.data["rle_mask"]]).astype(bool)
    np.testing.assert_array_equal(decoded, dense.mask)


def test_per_class_thresholds_and_class_filter(demo_model_dir, clip_frames):
    frame = clip_frames[2]
    params = {"image": [frame], "model_id": demo_model_dir}
    base = execution_engine(load_workflow(FASTPATH, **REFERENCE)).run(runtime_parameters=params)[0]["predictions"]
    names = sorted(set(base.data["class_name"].tolist()))
    assert names, "demo model gave no detections"
    dropped = names[0]
    strict = execution_engine(
        load_workflow(FASTPATH, per_class_confidence={dropped: 0.999}, **REFERENCE)
    ).run(runtime_parameters=params)[0]["predictions"]
    assert dropped not in strict.data["class_name"].tolist()
    assert len(strict) == len(base) - int((base.data["class_name"] == dropped).sum())
    filtered = execution_engine(load_workflow(FASTPATH, class_filter=[dropped], **REFERENCE)).run(
        runtime_parameters=params
    )[0]["predictions"]
    assert set(filtered.data["class_name"].tolist()) == {dropped}


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 10000), (20, 20), (10000, 3)])
def test_tiny_and_thin_frames_match_stock(engines, demo_model_dir, clip_frames, shape):
    """Masks that the stock polygon step cannot turn into a polygon (empty, one pixel, a straight
    line) are dropped by stock; our block drops the same detections."""
    import cv2

    ours_engine, stock_engine = engines
    frame = cv2.resize(clip_frames[0], (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    params = {"image": [frame], "model_id": demo_model_dir}
    ours = ours_engine.run(runtime_parameters=params)[0]["predictions"]
    stock = stock_engine.run(runtime_parameters=params)[0]["predictions"]
    report = compare_detections(ours, stock, polygonise_a=True)
    assert report.within(confidence=1e-5, box_px=1.0, mask_iou=0.999), report
