"""The fast stages inside the block (Triton interpreter on the CPU) give the reference stages' detections."""

from __future__ import annotations

import os

import pytest
import torch

from inference_fastpath.workflows.comparison import compare_detections
from inference_fastpath.workflows.running import execution_engine
from inference_fastpath.workflows import FASTPATH, load_workflow

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mask_output", ["dense", "rle"])
def test_triton_preprocess_and_fused_postprocess_match_the_reference(
    demo_model_dir, clip_frames, monkeypatch, mask_output
):
    from inference_fastpath.adapters.runner import RUNNERS

    if os.environ.get("TRITON_INTERPRET") != "1":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by .ci/run)")
    frame = clip_frames[0]
    params = {"image": [frame], "model_id": demo_model_dir}
    reference = execution_engine(
        load_workflow(FASTPATH, preprocess="reference", postprocess="reference", mask_output=mask_output)
    ).run(runtime_parameters=params)[0]["predictions"]
    fast = execution_engine(
        load_workflow(FASTPATH, preprocess="triton", postprocess="fused", mask_output=mask_output)
    ).run(runtime_parameters=params)[0]["predictions"]
    fast_runner = [r for key, r in RUNNERS._runners.items() if key[1].postprocess == "fused"][-1]
    assert [c.selected for c in fast_runner.choices if c.stage != "engine"] == ["triton", "fused"]
    assert [c.fallback_reason for c in fast_runner.choices if c.stage != "engine"] == [None, None]
    assert fast_runner.postprocess.fast.accumulation().exact  # no near-exact note either
    report = fast_runner.graph_report()  # what the many-camera benchmarks print after a run
    assert set(report["batch_sizes"]) == {1}  # one frame a run (the runner is shared by both mask outputs)
    assert set(report) == {"batch_sizes", "preprocess", "engine", "postprocess"}
    for stage in ("preprocess", "engine", "postprocess"):
        summary = report[stage]
        assert summary is not None and summary["evictions"] == 0, (stage, summary)
        if not torch.cuda.is_available():
            assert summary["captures"] == 0 and summary["live_keys"] == 0, (stage, summary)
    if not torch.cuda.is_available():  # the engine was asked for graphs and says why it has none
        assert "CUDA" in report["engine"]["off_reason"]
    if mask_output == "rle":
        assert list(fast.data["rle_mask"]) == list(reference.data["rle_mask"])
        assert len(fast) == len(reference) > 0
    else:
        report = compare_detections(fast, reference)
        assert report.within(confidence=0.0, box_px=0.0, mask_iou=1.0), report
