"""pipeline_depth=2 through a real InferencePipeline: every frame paired with its own result, none lost."""

from __future__ import annotations


import pytest

from inference_fastpath.workflows.comparison import compare_detections
from inference_fastpath.workflows.running import execution_engine, run_pipeline
from inference_fastpath.workflows import FASTPATH, load_workflow

from inference_fastpath.workflows.video_files import read_frames, write_clip
from support.pipeline_clips import no_worker_threads, short_clips

pytestmark = pytest.mark.slow
REFERENCE = dict(preprocess="reference", postprocess="reference")


def _workflow(depth: int) -> dict:
    return load_workflow(FASTPATH, pipeline_depth=depth, **REFERENCE)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, clip_path):
    return short_clips(tmp_path_factory.mktemp("depth"), clip_path)


def test_depth_2_equals_depth_1_frame_by_frame(demo_model_dir, clips):
    params = {"model_id": demo_model_dir}
    synchronous = run_pipeline(clips[4], _workflow(1), params)
    pipelined = run_pipeline(clips[4], _workflow(2), params)
    assert not synchronous.errors and not pipelined.errors
    assert pipelined.frame_ids == synchronous.frame_ids == [1, 2, 3, 4]
    for a, b in zip(synchronous.results, pipelined.results):
        report = compare_detections(a["predictions"], b["predictions"])
        assert report.within(confidence=0.0, box_px=0.0, mask_iou=1.0), report
        assert b["model_id"] == demo_model_dir
    assert no_worker_threads()


@pytest.mark.parametrize("frames", [1, 2])
def test_short_videos_flush_their_last_frame(demo_model_dir, clips, frames):
    run = run_pipeline(clips[frames], _workflow(2), {"model_id": demo_model_dir})
    assert not run.errors
    assert run.frame_ids == list(range(1, frames + 1))
    assert all(len(r["predictions"]) > 0 for r in run.results)
    assert no_worker_threads()


def test_two_sources_are_pipelined_and_complete(demo_model_dir, clips):
    run = run_pipeline([clips[2], clips[4]], _workflow(2), {"model_id": demo_model_dir})
    assert not run.errors
    per_source = {}
    for source, frame_id in zip(run.source_ids, run.frame_ids):
        per_source.setdefault(source, []).append(frame_id)
    assert sorted(per_source.values(), key=len) == [[1, 2], [1, 2, 3, 4]]
    assert no_worker_threads()


def test_termination_mid_stream_delivers_every_frame_the_block_took(demo_model_dir, clip_path, tmp_path):
    from inference_fastpath.adapters.runner import RUNNERS

    clip = write_clip(tmp_path / "ten.mp4", read_frames(clip_path, count=10, step=3))
    RUNNERS.clear()
    run = run_pipeline(str(clip), _workflow(2), {"model_id": demo_model_dir}, stop_after=2)
    runner = next(iter(RUNNERS._runners.values()))
    assert 2 <= len(run.results) < 10
    assert len(run.results) == len(runner.timings), "a frame the block finished was not delivered"
    assert run.frame_ids == sorted(set(run.frame_ids))
    assert no_worker_threads()


def test_execution_engine_outside_a_pipeline_returns_complete_results(demo_model_dir, clip_frames):
    import supervision as sv

    result = execution_engine(_workflow(2)).run(
        runtime_parameters={"image": clip_frames[:2], "model_id": demo_model_dir}
    )
    assert [type(r["predictions"]) for r in result] == [sv.Detections, sv.Detections]
    assert all(r["model_id"] == demo_model_dir for r in result)
