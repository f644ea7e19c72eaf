"""The `device` option on one GPU: explicit cuda:0, a GPU the process cannot see, two processes on one GPU.

None of these can show placement across GPUs; the CPU tests (tests/test_device_placement.py) check that
every stage runs with the step's device current."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FRAMES = 12


def _signatures(device: str) -> dict:
    """frame id -> (class ids, rounded boxes) of the fast workflow on the trained demo, RLE, depth 2."""
    from inference_fastpath.examples.trained_demo import build_trained_demo_model, default_video_path
    from inference_fastpath.workflows import FASTPATH, load_workflow
    from inference_fastpath.workflows.running import run_pipeline

    found = {}

    def keep(prediction, frame):
        detections = prediction["predictions"]
        found[str(frame.frame_id)] = [detections.class_id.tolist(), detections.xyxy.round(1).tolist()]

    workflow = load_workflow(FASTPATH, mask_output="rle", pipeline_depth=2, device=device)
    run_pipeline(str(default_video_path()), workflow, {"model_id": str(build_trained_demo_model())},
                 on_result=keep, stop_after=FRAMES, keep_results=False)
    return found


def _agree_on_common_frames(first: dict, second: dict) -> None:
    """Both runs saw at least FRAMES - 1 frames and agree on every frame both saw (``stop_after`` stops
    a pipeline after the frames already in flight, so one run may hold a frame or two more)."""
    common = set(first) & set(second)
    assert len(common) >= FRAMES - 1, (sorted(first), sorted(second))
    assert {key: first[key] for key in common} == {key: second[key] for key in common}


def test_explicit_cuda_0_runs_end_to_end_and_matches_auto():
    """On one GPU `auto` is cuda:0 too: this shows the explicit path works and shares auto's runner; it
    cannot show a stage landing on another GPU (that needs a multi-GPU host)."""
    from inference_fastpath.adapters.runner import RUNNERS

    auto = _signatures("auto")
    explicit = _signatures("cuda:0")
    _agree_on_common_frames(explicit, auto)
    devices = {str(runner.device) for runner in RUNNERS.runners()}
    assert devices == {"cuda:0"}, devices
    for runner in RUNNERS.runners():
        assert runner.loaded.device == torch.device("cuda", 0)


def test_a_gpu_this_process_does_not_see_is_refused_by_name():
    from inference_fastpath.adapters.device_placement import DevicePlacementError, resolve_device

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DevicePlacementError, match=missing):
        resolve_device(missing)


def test_two_processes_on_one_gpu_each_with_explicit_cuda_0():
    """Each process (this file run as a script) loads its own model and graphs on cuda:0."""
    processes = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "cuda:0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=240)[0] for process in processes]
    results = []
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-2000:]
        line = next(line for line in output.splitlines() if line.startswith("SIGNATURES "))
        results.append(json.loads(line[len("SIGNATURES "):]))
    _agree_on_common_frames(results[0], results[1])
    _agree_on_common_frames(results[0], _signatures("cuda:0"))


if __name__ == "__main__":
    print("SIGNATURES " + json.dumps(_signatures(sys.argv[1])), flush=True)
