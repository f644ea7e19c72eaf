"""The many-processes benchmark: the common-window aggregation on hand-made times, a small run of
two spawned worker processes on the CPU, and workers that fail or hang."""

from __future__ import annotations

import json
import time

import pytest

from inference_fastpath.examples.benchmarks import many_processes as mp

REFERENCE = "ref:preprocess=reference,postprocess=reference,cuda_graphs=false"


def test_common_window_counts_results_while_every_process_runs():
    # process 0 warms up at 1 and ends at 10, process 1 warms up at 3 and ends at 8: window (3, 8]
    times = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 3, 4, 6, 8]]
    window = mp.common_window_fps(times, warm_starts=[1, 3], last_results=[10, 8])
    assert window == {"fps": (5 + 3) / 5, "window_s": 5, "results": 8, "per_process_fps": [1.0, 0.6]}
    # counted results after each one's own warm start, over the whole span (10 - 1)
    assert mp.naive_fps(times, [1, 3], [10, 8]) == pytest.approx((9 + 3) / 9)


def test_a_process_that_ends_early_shrinks_the_window():
    times = [[1, 2, 3, 4, 5, 6], [1, 2, 3], [1, 2, 3, 4, 5, 6]]
    warm = [1, 1, 1]
    assert mp.common_window(warm, [6, 3, 6]) == (1, 3)
    assert mp.common_window_fps(times, warm, [6, 3, 6])["per_process_fps"] == [1.0, 1.0, 1.0]
    assert mp.common_window_fps(times, warm, [6, 6, 6])["window_s"] == 5


def test_an_empty_window_gives_no_rate():
    # process 1 warms up only after process 0 has finished
    times = [[0, 1, 2], [3, 4, 5]]
    assert mp.common_window([1, 4], [2, 5]) is None
    assert mp.common_window_fps(times, [1, 4], [2, 5]) == {"fps": None, "window_s": None, "results": 0,
                                                          "per_process_fps": None}
    assert mp.naive_fps(times, [1, 4], [2, 5]) == pytest.approx(2 / 4)
    # a process that counted nothing: no window either
    assert mp.common_window([1, None], [2, None]) is None and mp.common_window([], []) is None


def test_warm_bounds_skip_the_warm_up_over_all_streams_in_time_order():
    # results 1 and 2 warm up: the clock starts at 2, so 3, 4, 5 count over 2 -> 5
    assert mp.warm_bounds([[1.0, 3.0, 5.0], [2.0, 4.0]], warmup_results=2) == (2.0, 5.0)
    assert mp.warm_bounds([[1.0, 3.0], [2.0]], warmup_results=0) == (1.0, 3.0)
    assert mp.warm_bounds([[1.0], [2.0]], warmup_results=2) == (None, None)


def _report(index, at, warm, last, **streams):
    stream_rows = [dict(delivered=len(s), dropped=0, in_order=True) for s in at]
    result = dict(streams=stream_rows, all_frames_delivered_in_order=True, results_mispaired=0,
                  streams_holding_rate=len(at), **streams)
    return dict(index=index, result=result, at=at, latency_ms=[10.0, 20.0], warm_started_at=warm,
                last_result_at=last, peak_gpu_memory_mib=None, gpu_memory_nvidia_smi_mib=None)


def test_aggregate_sums_the_processes_and_reports_a_failure():
    reports = [_report(0, [[0, 2, 4], [1, 3, 5]], 1, 5, streams_holding_rate_results_clock=1,
                       last_result_latency_ms_max=640.0, cameras_behind_schedule=0),
               _report(1, [[2, 3, 4]], 2, 4, streams_holding_rate_results_clock=0,
                       last_result_latency_ms_max=35.0, cameras_behind_schedule=1)]
    record = mp.aggregate("ours", reports, 2, realtime_fps=30)
    assert record["streams_holding_rate_results_clock"] == 1 and record["last_result_latency_ms_max"] == 640.0
    assert record["cameras_behind_schedule"] == 1 and "up to 640.0 ms late" in mp.describe(record)
    assert record["fps"] == 2.0 and record["stream_fps_in_window"] == [0.5, 0.5, 1.0]
    assert record["frames"] == 9 and record["results_mispaired"] == 0 and record["streams_holding_rate"] == 3
    assert record["latency_ms_p50"] == 15.0 and not record["failed"] and "K=2" in mp.describe(record)
    failed = mp.aggregate("ours", [reports[0], {"index": 1, "error": "ValueError: boom"}], 2, None)
    assert failed["failed"] and failed["fps"] is None and failed["process_errors"] == ["process 1: ValueError: boom"]
    assert "FAILED: process 1: ValueError: boom" in mp.describe(failed)


@pytest.mark.slow
def test_two_processes_deliver_every_frame_in_order_and_write_json_and_plot(demo_model_dir, tiny_clip, tmp_path):
    out = tmp_path / "processes.json"
    assert mp.main(["--video", tiny_clip, "--model", demo_model_dir, "--frames", "3", "--warmup", "1",
                    "--processes", "2", "--sources-per-process", "1", "--stock-sources", "0",
                    "--config", REFERENCE, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["frames_per_source"] == 3 and report["device"] and report["options"]["preprocess"] == "reference"
    (record,) = report["results"]
    assert record["name"] == "ref" and record["processes"] == 2 and not record["failed"]
    assert record["frames"] == 6 and record["dropped"] == 0 and record["all_frames_delivered_in_order"]
    assert record["results_mispaired"] == 0 and record["fps_naive"] > 0
    assert record["fps"] is None or record["fps"] > 0  # three frames a process need not overlap
    # sources alternate over all processes: the second process plays the mirrored clip
    videos = [p["streams"][0]["video"] for p in record["per_process"]]
    assert videos[1] == "mirrored.mp4" and videos[0] != videos[1]
    assert all(p["results_compared"] == 3 for p in record["per_process"])
    assert out.with_suffix(".png").is_file()


def test_a_worker_hands_the_batch_timeout_to_its_pipeline(monkeypatch):
    import threading

    from inference_fastpath.examples.benchmarks import many_sources

    seen = {}

    def fake_run_sources(name, workflow, videos, model, warmup, frames, options, expected, **kwargs):
        seen.update(kwargs)
        return {"times": {"at": [[1.0, 2.0]], "latency_ms": [5.0]}, "unusable_sources": [],
                "peak_gpu_memory_mib": None}

    monkeypatch.setattr(many_sources, "run_sources", fake_run_sources)
    spec = mp.WorkerSpec("stock", ("a.mp4",), (), "model", 0, 2, None, realtime_fps=30.0, batch_timeout=0.02)
    report = mp.measure(spec, threading.Barrier(1))
    assert seen["batch_timeout"] == 0.02 and seen["realtime_fps"] == 30.0 and report["last_result_at"] == 2.0


def test_a_negative_batch_timeout_is_refused(capsys):
    with pytest.raises(SystemExit):
        mp.main(["--processes", "1", "--batch-timeout", "-1"])
    assert "--batch-timeout takes seconds >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_live_processes_warm_up_before_the_start_barrier(demo_model_dir, tiny_clip, tmp_path):
    out = tmp_path / "live.json"
    assert mp.main(["--video", tiny_clip, "--model", demo_model_dir, "--frames", "3", "--warmup", "0",
                    "--processes", "2", "--sources-per-process", "1", "--stock-sources", "0", "--realtime", "10",
                    "--warm-before-live", "2", "--pinned-decode", "--config", REFERENCE, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (record,) = report["results"]
    assert not record["failed"] and record["results_mispaired"] == 0
    assert all(p["warm_pass_results"] >= 2 for p in record["per_process"])
    # --pinned-decode reaches every worker: its live run's frames came from the pinned frame pool
    assert report["pinned_decode"] and all(p["pinned_decode"] and p["decoded_unpinned"] == 0
                                           and p["decoded_pinned"] >= 1 for p in record["per_process"])
    assert all(1 <= s["delivered"] <= 3 for p in record["per_process"] for s in p["streams"])


@pytest.mark.slow
def test_a_failing_worker_is_reported_and_the_others_stop_waiting(tiny_clip, tmp_path):
    """Process 1 cannot load its model before the start; process 0, already at the barrier (it
    builds no references), is released by the broken barrier long before its timeout."""
    options = dict(preprocess="reference", postprocess="reference", cuda_graphs=False)
    waiting = mp.WorkerSpec("ref", (tiny_clip,), (), str(tmp_path / "no-model"), 0, 3, options,
                            barrier_timeout_s=300)
    failing = mp.WorkerSpec("ref", (tiny_clip,), (tiny_clip,), str(tmp_path / "no-model"), 0, 3, options)
    started = time.monotonic()
    reports = mp.run_processes([waiting, failing], timeout_s=300)
    assert time.monotonic() - started < 150
    assert "no-model" in reports[1]["error"] and "Traceback" in reports[1]["traceback"]
    assert "barrier broke" in reports[0]["error"] or "terminated after process 1 failed" in reports[0]["error"]
    record = mp.aggregate("ref", reports, 1, None)
    assert record["failed"] and any("no-model" in e for e in record["process_errors"])


@pytest.mark.slow
def test_a_worker_past_the_timeout_is_terminated(tiny_clip, tmp_path):
    spec = mp.WorkerSpec("ref", (tiny_clip,), (tiny_clip,), str(tmp_path / "no-model"), 0, 3, None)
    started = time.monotonic()
    (report,) = mp.run_processes([spec], timeout_s=1)  # still importing inference by then
    assert "still running after 1 s: terminated" in report["error"]
    assert time.monotonic() - started < 30
