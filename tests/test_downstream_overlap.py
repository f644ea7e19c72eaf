"""downstream_overlap: run N delivers frame N-1 with its image; InferencePipeline pairs every frame right."""

from __future__ import annotations

import logging
from concurrent.futures import Future

import numpy as np
import pytest

from inference_fastpath.adapters.scheduling.previous_frame import BatchSizeChanged, PreviousFrameDelivery
from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, load_workflow
from inference_fastpath.workflows.comparison import compare_detections
from inference_fastpath.workflows.running import execution_engine, run_pipeline
from support.pipeline_clips import no_worker_threads, short_clips

# the CPU twins: the test is about pairing, not speed
REFERENCE = dict(preprocess="reference", postprocess="reference")


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# ---------------------------------------------------------------- the delivery line alone


def test_first_run_delivers_nothing_then_each_run_the_previous_frames():
    delivery = PreviousFrameDelivery(keys=("predictions", "model_id"), image_key="image")
    assert delivery.exchange(["a"], [_done({"predictions": 1, "model_id": "m"})]) == [
        {"predictions": None, "model_id": None, "image": None}]
    assert delivery.holding == 1
    second = delivery.exchange(["b"], [_done({"predictions": 2, "model_id": "m"})])
    assert second == [{"predictions": 1, "model_id": "m", "image": "a"}]
    assert delivery.drain() == [([(0,)], [{"predictions": 2, "model_id": "m", "image": "b"}])]
    assert delivery.drain() == [] and delivery.holding == 0


def test_batches_keep_their_indices_and_order():
    class Images(list):
        indices = [(0,), (1,)]

    delivery = PreviousFrameDelivery(keys=("predictions",), image_key="image")
    delivery.exchange(Images(["a0", "a1"]), [{"predictions": "p0"}, {"predictions": "p1"}])
    assert delivery.exchange(Images(["b0", "b1"]), [{"predictions": "q0"}, {"predictions": "q1"}]) == [
        {"predictions": "p0", "image": "a0"}, {"predictions": "p1", "image": "a1"}]
    indices, outputs = delivery.drain()[0]
    assert indices == [(0,), (1,)] and [o["image"] for o in outputs] == ["b0", "b1"]


def test_a_changed_batch_size_is_a_clear_error_and_keeps_what_was_held():
    delivery = PreviousFrameDelivery(keys=("predictions",), image_key="image")
    delivery.exchange(["a0", "a1"], [{"predictions": 0}, {"predictions": 1}])
    with pytest.raises(BatchSizeChanged, match="previous run's 2 frame.*run of 1 frame"):
        delivery.exchange(["b0"], [{"predictions": 2}])
    assert delivery.holding == 2


def test_a_failed_frame_raises_when_it_is_delivered():
    delivery = PreviousFrameDelivery(keys=("predictions",), image_key="image")
    failed: Future = Future()
    failed.set_exception(RuntimeError("engine exploded"))
    delivery.exchange(["a"], [failed])
    with pytest.raises(RuntimeError, match="engine exploded"):
        delivery.exchange(["b"], [{"predictions": 1}])


# ---------------------------------------------------------------- the manifest


def _manifest(**step):
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BlockManifest

    return BlockManifest.model_validate({"type": "fastpath/rfdetr_instance_segmentation@v1", "name": "seg",
                                         "images": "$inputs.image", "model_id": "m", **step})


def test_overlap_needs_depth_2_and_a_literal_value():
    with pytest.raises(ValueError, match="downstream_overlap.*pipeline_depth.*got pipeline_depth=1"):
        _manifest(downstream_overlap=True)
    with pytest.raises(ValueError, match="fixed when the workflow is compiled"):
        _manifest(downstream_overlap="$inputs.overlap", pipeline_depth=2)
    manifest = _manifest(downstream_overlap=True, pipeline_depth=2)
    assert "image" in [output.name for output in manifest.get_actual_outputs()]


# ---------------------------------------------------------------- through InferencePipeline


@pytest.fixture(scope="module")
def clips(tmp_path_factory, clip_path):
    return short_clips(tmp_path_factory.mktemp("overlap"), clip_path)


def _annotated(overlap: bool) -> dict:
    return load_workflow(FASTPATH_ANNOTATED, pipeline_depth=2, downstream_overlap=overlap, **REFERENCE)


@pytest.mark.slow
def test_overlapped_annotated_workflow_equals_the_unoverlapped_one_frame_by_frame(demo_model_dir, clips, caplog):
    params = {"model_id": demo_model_dir}
    plain = run_pipeline(clips[4], _annotated(False), params)
    with caplog.at_level(logging.INFO, logger="inference_fastpath"):
        overlapped = run_pipeline(clips[4], _annotated(True), params)
    assert "downstream_overlap on" in caplog.text  # the runs really were delayed
    assert not plain.errors and not overlapped.errors
    assert overlapped.frame_ids == plain.frame_ids == [1, 2, 3, 4]
    for frame_id, a, b in zip(plain.frame_ids, plain.results, overlapped.results):
        report = compare_detections(a["predictions"], b["predictions"])
        assert report.within(confidence=0.0, box_px=0.0, mask_iou=1.0), (frame_id, report)
        # the picture of the same frame, painted from the same masks
        assert np.array_equal(a["annotated"].numpy_image, b["annotated"].numpy_image), frame_id
        assert b["annotated"].video_metadata.frame_number == frame_id
    assert no_worker_threads()


@pytest.mark.slow
@pytest.mark.parametrize("frames", [1, 2])
def test_overlapped_short_videos_flush_their_last_frame(demo_model_dir, clips, frames):
    run = run_pipeline(clips[frames], _annotated(True), {"model_id": demo_model_dir})
    assert not run.errors
    assert run.frame_ids == list(range(1, frames + 1))
    assert all(len(r["predictions"]) > 0 for r in run.results)
    assert [r["annotated"].video_metadata.frame_number for r in run.results] == run.frame_ids
    assert no_worker_threads()


@pytest.mark.slow
def test_the_execution_engine_outside_a_pipeline_is_never_delayed(demo_model_dir, clip_frames):
    import supervision as sv

    workflow = load_workflow(FASTPATH, pipeline_depth=2, downstream_overlap=True, **REFERENCE)
    workflow["outputs"].append({"type": "JsonField", "name": "frame", "selector": "$steps.segmentation.image"})
    result = execution_engine(workflow).run(runtime_parameters={"image": clip_frames[:2], "model_id": demo_model_dir})
    assert [type(r["predictions"]) for r in result] == [sv.Detections, sv.Detections]
    for output, frame in zip(result, clip_frames[:2]):
        assert np.array_equal(output["frame"].numpy_image, frame)


@pytest.mark.slow
def test_a_visualization_wired_to_the_input_image_is_told_it_paints_another_frame(demo_model_dir, clips, caplog):
    workflow = _annotated(True)
    masks = next(step for step in workflow["steps"] if step["name"] == "masks")
    masks["image"] = "$inputs.image"  # one frame ahead of the predictions under downstream_overlap
    with caplog.at_level(logging.WARNING, logger="inference_fastpath"):
        run = run_pipeline(clips[4], workflow, {"model_id": demo_model_dir})
    assert not run.errors and run.frame_ids == [1, 2, 3, 4]  # still painted, the stream goes on
    assert "predictions were made on video frame 1 but the image is frame 2" in caplog.text
    assert caplog.text.count("predictions were made on video frame") == 1  # once per step
