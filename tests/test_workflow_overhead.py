"""workflow_overhead: the Execution Engine's own host cost with our step's outputs replayed (CPU)."""

import pytest


def test_workflow_overhead_times_the_engine_with_our_step_replayed(demo_model_dir, clip_frames, monkeypatch):
    from inference_fastpath.adapters.runner import SegmentationRunner
    from inference_fastpath.examples.benchmarks import workflow_overhead

    real = SegmentationRunner.submit
    calls = []

    def counting_submit(self, images, inputs, scheduler, step_name=""):
        calls.append(images[0].numpy_image.__array_interface__["data"][0])
        return real(self, images, inputs, scheduler, step_name)

    monkeypatch.setattr(SegmentationRunner, "submit", counting_submit)
    frames = clip_frames[:2]
    result = workflow_overhead.measure("annotated", demo_model_dir, frames, passes=2)
    assert len(calls) == len(frames) == len(set(calls))  # the model ran once per frame, never in the timed passes
    assert SegmentationRunner.submit is counting_submit  # the replay is undone on exit
    assert result["frames"] == 2 and 0 < result["ms_per_frame_min"] <= result["ms_per_frame_median"]


def test_workflow_overhead_runs_frames_as_batches_of_several_sources(demo_model_dir, clip_frames, monkeypatch):
    from inference_fastpath.adapters.runner import SegmentationRunner
    from inference_fastpath.examples.benchmarks import workflow_overhead

    real = SegmentationRunner.submit
    batches = []

    def counting_submit(self, images, inputs, scheduler, step_name=""):
        batches.append(len(images))
        return real(self, images, inputs, scheduler, step_name)

    monkeypatch.setattr(SegmentationRunner, "submit", counting_submit)
    result = workflow_overhead.measure("plain", demo_model_dir, clip_frames[:2], passes=2, batch=3,
                                       options={"mask_output": "rle"})
    assert batches == [3]  # one run of three frames (the clip played again to fill it), computed once
    assert result["frames"] == 3 and result["batch"] == 3 and result["options"] == {"mask_output": "rle"}
    assert result["ms_per_batch_median"] == pytest.approx(3 * result["ms_per_frame_median"])
    with pytest.raises(ValueError, match="batch must be at least 1"):
        workflow_overhead.measure("plain", demo_model_dir, clip_frames[:2], batch=0)


def test_workflow_overhead_inline_steps_run_on_the_calling_thread(demo_model_dir, clip_frames, monkeypatch):
    import threading

    from inference_fastpath.adapters.runner import SegmentationRunner
    from inference_fastpath.examples.benchmarks import workflow_overhead

    real = SegmentationRunner.submit
    threads = []

    def recording_submit(self, images, inputs, scheduler, step_name=""):
        threads.append(threading.current_thread().name)
        return real(self, images, inputs, scheduler, step_name)

    monkeypatch.setattr(SegmentationRunner, "submit", recording_submit)
    inline = workflow_overhead.measure("annotated", demo_model_dir, clip_frames[:1], passes=1, steps="inline")
    pooled = workflow_overhead.measure("annotated", demo_model_dir, clip_frames[:1], passes=1, steps="pool")
    assert threads[0] == threading.current_thread().name and threads[1].startswith("workflow-steps")
    assert inline["steps"] == "inline" and pooled["steps"] == "pool" and inline["ms_per_frame_median"] > 0
    with pytest.raises(ValueError, match="steps must be"):
        workflow_overhead.measure("plain", demo_model_dir, clip_frames[:1], steps="fast")


def test_workflow_overhead_names_bad_batch_sizes(capsys):
    from inference_fastpath.examples.benchmarks.workflow_overhead import main

    with pytest.raises(SystemExit):
        main(["--batches", "1,x"])
    assert "--batches must be a comma list of integers" in capsys.readouterr().err
