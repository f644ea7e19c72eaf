"""What the stream-manager benchmark reads from the manager's status report (the form recorded from
inference 1.8.3's `/inference_pipelines/{id}/status` for a source that cannot be opened), and what it
says of a server process that exited before answering."""

from __future__ import annotations

from inference_fastpath.examples.benchmarks.stream_manager import last_error_line, source_problems
from inference_fastpath.examples.benchmarks.stream_manager_report import all_running_rate, processing_rate

DEAD_SOURCE_REPORT = {
    "status": "success",
    "report": {
        "video_source_status_updates": [
            {"severity": 20, "event_type": "INFERENCE_THREAD_STARTED", "payload": {}},
            {"severity": 20, "event_type": "SOURCE_STATE_UPDATE",
             "payload": {"previous_state": "NOT_STARTED", "new_state": "INITIALISING", "source_id": 0}},
            {"severity": 20, "event_type": "SOURCE_STATE_UPDATE",
             "payload": {"previous_state": "INITIALISING", "new_state": "ERROR", "source_id": 0}},
            {"severity": 40, "event_type": "INFERENCE_ERROR",
             "payload": {"error_type": "SourceConnectionError",
                         "error_message": "Cannot connect to video source under reference: /tmp/gone.mp4"}},
        ],
        "sources_metadata": [{"source_reference": "/tmp/gone.mp4", "state": "ERROR", "source_id": 0}],
    },
}


class _Response:
    def __init__(self, status_code, body):
        self.status_code, self._body = status_code, body

    def json(self):
        return self._body


class _Client:
    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def get(self, url):
        self.asked.append(url)
        return self.answers.pop(0)


def test_source_errors_are_collected_once_and_states_returned():
    seen = []
    client = _Client(_Response(200, DEAD_SOURCE_REPORT), _Response(200, DEAD_SOURCE_REPORT))
    assert source_problems(client, "http://h", "p1", seen) == ["ERROR"]
    assert source_problems(client, "http://h", "p1", seen) == ["ERROR"]
    assert seen == ["source 0 entered the ERROR state",
                    "INFERENCE_ERROR: SourceConnectionError: Cannot connect to video source under reference: /tmp/gone.mp4"]
    assert client.asked == ["http://h/inference_pipelines/p1/status"] * 2


def test_a_forgotten_pipeline_gives_no_states_and_adds_nothing():
    seen = ["earlier"]
    assert source_problems(_Client(_Response(404, {"error_type": "ProcessesManagerNotFoundError"})), "h", "p", seen) is None
    assert seen == ["earlier"]
    healthy = {"report": {"video_source_status_updates": [], "sources_metadata": [{"state": "RUNNING"}]}}
    assert source_problems(_Client(_Response(200, healthy)), "h", "p", seen) == ["RUNNING"] and seen == ["earlier"]


def test_an_early_exit_is_reported_by_the_exception_that_caused_it(tmp_path):
    # the GPU host's server log when a dependency of inference's HTTP API was missing
    log = tmp_path / "server.log"
    log.write_text(
        "INFO: loading\nTraceback (most recent call last):\n"
        '  File "/tmp/site/aiortc/mediastreams.py", line 8, in <module>\n'
        "    from av import AudioFrame, VideoFrame\n"
        "ModuleNotFoundError: No module named 'av'\n\n")
    assert last_error_line(log) == "ModuleNotFoundError: No module named 'av'"
    log.write_text("started\nshutting down\n")
    assert last_error_line(log) == "shutting down"
    log.write_text("")
    assert last_error_line(log) == "its log is empty"
    assert last_error_line(tmp_path / "missing.log").startswith("its log could not be read")


def _rows(*times):
    return [{"at": t} for t in times]


def test_the_all_running_window_counts_only_while_every_pipeline_delivers():
    # pipeline 0 runs alone from 0 to 2; pipeline 1 starts at 2 (its warm-up result) and outlives it
    rate = all_running_rate([_rows(0, 1, 2, 3, 4, 5, 6), _rows(2.0, 2.5, 3, 3.5, 4, 9)], warmup=0)
    assert rate["window_s"] == 4.0  # from the later first result (2) to the earlier last result (6)
    assert rate["per_pipeline"] == [4 / 4.0, 4 / 4.0]  # (2, 6]: 3,4,5,6 and 2.5,3,3.5,4
    assert rate["fps"] == 2.0


def test_pipelines_that_never_ran_together_have_no_window():
    assert all_running_rate([_rows(0, 1), _rows(2, 3)], warmup=0)["fps"] is None
    assert all_running_rate([_rows(0, 1, 2), []], warmup=0)["fps"] is None  # one never delivered
    assert all_running_rate([_rows(0, 1, 2, 3), _rows(1, 2, 3)], warmup=1)["window_s"] == 1.0


# streamvision 0.1.3's completion counters, as its watchdog reports them in the status
def _counted(done_per_source, clock):
    return {"report": {"video_source_status_updates": [], "sources_metadata": [{"state": "RUNNING"}],
                       "completion_statistics": {"sampled_at_monotonic": clock,
                                                 "sources": [{"source_id": i, "completed_frames": n}
                                                             for i, n in enumerate(done_per_source)]}}}


def test_the_status_frame_counter_is_kept_on_the_pipelines_own_clock():
    completions, seen = [], []
    client = _Client(_Response(200, _counted([40, 2], 1000.5)), _Response(200, DEAD_SOURCE_REPORT))
    source_problems(client, "h", "p", seen, completions)
    source_problems(client, "h", "p", seen, completions)  # a report without counters adds no sample
    assert len(completions) == 1
    _, clock, done = completions[0]
    assert (clock, done) == (1000.5, 42)


def _series(*points):  # (benchmark time, pipeline clock, completed)
    return list(points)


def test_processing_counts_only_while_every_pipeline_is_still_working():
    fast = _series((0, 100, 0), (1, 101, 300), (2, 102, 600), (3, 103, 600), (4, 104, 600))
    slow = _series((0, 7, 0), (1, 8, 100), (2, 9, 200), (3, 10, 300), (4, 11, 400))
    rate = processing_rate([fast, slow], opened_at=0.0)
    # the window closes when the fast one's count stops rising (t=2), so the slow one's tail after it
    # and the fast one's idle time are both left out
    assert rate["per_pipeline"] == [300.0, 100.0] and rate["fps"] == 400.0 and rate["window_s"] == 2.0
    # before the window opens (the pause, the resume) nothing counts
    late = processing_rate([fast, slow], opened_at=1.0)
    assert late["per_pipeline"] == [300.0, 100.0] and late["window_s"] == 1.0


def test_processing_without_two_samples_inside_the_window_has_no_rate():
    assert processing_rate([_series((0, 1, 0), (1, 2, 50)), []], opened_at=0)["fps"] is None
    done_before = _series((0, 1, 100), (1, 2, 100))  # ended before the window opened
    assert processing_rate([done_before, _series((0, 5, 0), (1, 6, 10))], opened_at=0.5)["fps"] is None
