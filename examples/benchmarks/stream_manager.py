"""Many pipelines through the inference server's stream manager: one process per pipeline.

    python -m inference_fastpath.examples.benchmarks.stream_manager --pipelines 1,2,4 --frames 100 \\
        --config "rle-d2:mask_output=rle,pipeline_depth=2" --out stream_manager.json

Starts the real stream manager (``python -m streamvision`` with inference's pipeline host; its pipeline
processes forked or spawned, ``--start-method``) and the inference HTTP server with
``ENABLE_STREAM_API`` on 127.0.0.1, then, for each M, initialises M
pipelines over ``POST /inference_pipelines/initialise`` with our workflow specification (each on
its own copy of the clip, WAIT/LAZY buffering) and drains each one's results over
``GET /inference_pipelines/{id}/consume`` on its own thread. Reports the aggregate and per-pipeline
FPS (results over the time they arrived in), frames delivered and lost per pipeline, whether they
came in order, results whose detections differ from an in-process run of the same frame, and the
GPU memory of each pipeline process (``nvidia-smi``). The stock v3 block runs the same setup once.

Properties of the stream manager shape the measurement:

* it ends a pipeline as soon as every source has been read to its end, and drops the results
  still buffered in that pipeline's process; so the decoding buffer is kept at 2 frames, and
  results that ``consume`` had not fetched by then are reported as lost;
* it handles one command at a time for all pipelines, and ``consume`` returns one result per
  request, serialised in the pipeline's process: so the delivered rate measures that path, and the
  pipelines' own frame counters (their status reports) measure the processing apart from it;
* pipelines start one after another, each a model load apart (interpreter starts are taken out by
  the manager's warm pool of idle processes). A file cannot be held back meanwhile: the API's
  ``pause`` mutes the source, which reads the file on and drops its frames. So the rates are taken
  while all M run (``all_running_rate``, ``processing_rate``), and the clip must outlast the start-up
  of the others: ``--frames`` loops it, and ``--max-fps 30`` plays each file as a 30 FPS camera
  (every frame processed, paced), which is also the real-time question: do M streams hold 30 FPS?
* a pipeline whose source cannot be opened fails within milliseconds of its start, and the manager
  forgets it, status report included, about a second later, at times before the initialise call has
  even answered: the benchmark polls the status right after each initialise and while draining,
  keeps what it saw (``source_problems``), and flags a pipeline that ended without a frame.

The benchmark opts the server in to local model packages (the demo model is a directory), as an
operator does on their own machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from inference_fastpath.examples.benchmarks.stream_manager_report import (
    CompletionSample,
    all_running_rate,
    completed_frames,
    detections_signature,
    processing_rate,
)
from inference_fastpath.workflows.placement import on_device, round_robin_devices
from inference_fastpath.workflows.running import configure_environment

configure_environment()

DECODING_BUFFER = 2
STARTUP_S = 300.0
IDLE_S = 150.0  # the first result waits for the process start, the model load and the graph captures
STATUS_POLL_S = 0.5  # the manager forgets a failed pipeline about a second after it fails
WARM_POOL_S = 240.0  # M interpreters importing inference at once, on the GPU host's cores
CONSUME_TIMEOUT_NOTE = "a status or consume request waited over 30 s: the manager serves one command at a time"
SETTLE_S = 1.0  # after the last start: its first frames capture CUDA graphs


def _free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def server_environment(manager_port: int, max_pipelines: int) -> Dict[str, str]:
    """The environment of the stream manager and the HTTP server (both read it)."""
    return {
        **os.environ,
        "ENABLE_STREAM_API": "True",
        "STREAM_MANAGER_HOST": "127.0.0.1",
        "STREAM_MANAGER_PORT": str(manager_port),
        "STREAM_MANAGER_MAX_ACTIVE_PIPELINES": str(max(8, max_pipelines)),
        "WORKFLOWS_PLUGINS": "inference_fastpath",
        "ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES": "True",
        "DISABLE_VERSION_CHECK": "True",
        "METRICS_ENABLED": "False",
        "ACTIVE_LEARNING_ENABLED": "False",
        "CORE_MODEL_GAZE_ENABLED": "False",
    }


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def last_error_line(log: Path) -> str:
    """The last exception line of a process's log (what made it exit), else its last line.

    Example:
        >>> last_error_line(Path("logs/server.log"))  # doctest: +SKIP
        "ModuleNotFoundError: No module named 'av'"
    """
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as error:
        return f"its log could not be read: {error}"
    if not lines:
        return "its log is empty"
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1])


@contextlib.contextmanager
def running_stream_api(log_dir: Path, max_pipelines: int, start_method: str = "fork",
                       warm_pipelines: int = 0) -> Iterator[Tuple[str, int]]:
    """The stream manager (pipeline processes started by ``start_method``, ``warm_pipelines`` of them kept
    started and idle) and the HTTP server, started and stopped together; yields (the base URL, the
    manager's process id)."""
    import httpx

    manager_port, http_port = _free_port(), _free_port()
    environment = server_environment(manager_port, max_pipelines)
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        logs = {"stream manager": log_dir / "stream_manager.log", "server": log_dir / "server.log"}
        with open(logs["stream manager"], "w") as manager_log, open(logs["server"], "w") as server_log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "inference_fastpath.examples.benchmarks.stream_manager_launch",
                 "--start-method", start_method, "--host-factory",
                 "inference.core.interfaces.legacy_stream.host:LegacyPipelineHost",
                 "--warm-pipelines", str(warm_pipelines)],
                env=environment, stdout=manager_log, stderr=subprocess.STDOUT))
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "inference_fastpath.examples.serve:build_app", "--factory",
                 "--host", "127.0.0.1", "--port", str(http_port), "--log-level", "warning"],
                env=environment, stdout=server_log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            for process, (name, log) in zip(processes, logs.items()):
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} exited early ({last_error_line(log)}); see {log_dir}")
            try:
                if httpx.get(f"{base}/inference_pipelines/list", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stream API did not come up in {STARTUP_S:.0f} s; see {log_dir}")
            time.sleep(1)
        yield base, processes[0].pid
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_idle_pool(manager_pid: int, count: int, timeout_s: float = WARM_POOL_S) -> str:
    """Waits until the manager has ``count`` pipeline processes that have finished importing (their CPU
    use has settled), so initialising M pipelines measures the model load, not M interpreter starts.
    The manager's API lists only pipelines in use, so the processes are read from the OS. Returns what
    it saw, for the log."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            children = [child for child in psutil.Process(manager_pid).children()
                        if "resource_tracker" not in " ".join(child.cmdline())]
            busy = [child for child in children if child.cpu_percent(interval=0.3) > 10.0]
        except psutil.Error:
            children, busy = [], []
        if len(children) >= count and not busy:
            return f"{len(children)} idle pipeline processes ready"
        if time.monotonic() > deadline:
            return f"went on after {timeout_s:.0f} s with {len(children)} pipeline processes, {len(busy)} still busy"
        time.sleep(1.0)


def initialise_payload(video: str, workflow: dict, model: str, max_fps: Optional[float] = None) -> Dict[str, Any]:
    """The ``/inference_pipelines/initialise`` body: one file, WAIT/LAZY buffering (no frame dropped),
    paced to ``max_fps`` when given (every frame still processed)."""
    return {
        "video_configuration": {
            "type": "VideoConfiguration", "video_reference": str(video), "max_fps": max_fps,
            "source_buffer_filling_strategy": "WAIT", "source_buffer_consumption_strategy": "LAZY",
        },
        "processing_configuration": {
            "type": "WorkflowConfiguration", "workflow_specification": workflow,
            "workflows_parameters": {"model_id": model},
        },
        "sink_configuration": {"type": "MemorySinkConfiguration", "results_buffer_size": 4096},
        "decoding_buffer_size": DECODING_BUFFER,
    }


def source_problems(client: Any, base: str, pipeline_id: str, seen: List[str],
                    completions: Optional[List[CompletionSample]] = None) -> Optional[List[str]]:
    """Adds to ``seen`` what the manager's status report says went wrong with the pipeline's
    sources: a source entering the ERROR state and error events (connection lost, cannot open).
    The manager removes a pipeline soon after its only source fails, and its report with it, so
    this is polled while the pipeline runs. The report's frame counter goes to ``completions``. Returns
    the sources' states (None once the manager no longer knows the pipeline)."""
    response = client.get(f"{base}/inference_pipelines/{pipeline_id}/status")
    if response.status_code != 200:
        return None
    report = response.json().get("report") or {}
    counted = completed_frames(report, time.monotonic())
    if completions is not None and counted is not None:
        completions.append((time.perf_counter(), *counted))
    for update in report.get("video_source_status_updates") or []:
        payload = update.get("payload") or {}
        if update.get("severity", 0) >= 40:
            text = f"{update.get('event_type')}: {payload.get('error_type')}: {payload.get('error_message')}"
        elif payload.get("new_state") == "ERROR":
            text = f"source {payload.get('source_id')} entered the ERROR state"
        else:
            continue
        if text not in seen:
            seen.append(text)
    return [str(source.get("state")) for source in report.get("sources_metadata") or []]


def await_sources(client: Any, base: str, pipeline_id: str, seen: List[str], timeout_s: float = 5.0) -> None:
    """Polls a newly initialised pipeline's status until its sources have started or failed: a
    source that cannot be opened fails within milliseconds of the start, and the manager forgets
    the pipeline, report included, a second or two later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = source_problems(client, base, pipeline_id, seen)
        if states is None or (states and not set(states) & {"NOT_STARTED", "INITIALISING"}):
            return
        time.sleep(0.05)


def drain(base: str, pipeline_id: str, rows: List[Dict[str, Any]], timeout_s: float,
          problems: Optional[List[str]] = None, completions: Optional[List[CompletionSample]] = None,
          excluded_fields: Sequence[str] = ()) -> Optional[str]:
    """Consume ``pipeline_id``'s results into ``rows`` until the manager ends it, polling its
    status for source problems into ``problems`` and its frame counter into ``completions``; returns
    the reason it stopped. ``excluded_fields`` are workflow outputs the server leaves out of each
    result (``predictions``: no mask is serialised). A request the busy manager does not answer in
    time is noted in ``problems`` once and retried."""
    import httpx

    deadline = time.monotonic() + timeout_s
    problems = [] if problems is None else problems
    polled = 0.0
    last_result = time.monotonic()
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline:
            if time.monotonic() - last_result > IDLE_S:
                return f"no result for {IDLE_S:.0f} s (a pipeline whose every frame fails is not ended by the manager)"
            try:
                if time.monotonic() - polled > STATUS_POLL_S:
                    source_problems(client, base, pipeline_id, problems, completions)
                    polled = time.monotonic()
                response = client.request("GET", f"{base}/inference_pipelines/{pipeline_id}/consume",
                                          json={"excluded_fields": list(excluded_fields)} if excluded_fields else None)
            except httpx.TimeoutException:
                if CONSUME_TIMEOUT_NOTE not in problems:
                    problems.append(CONSUME_TIMEOUT_NOTE)
                continue
            if response.status_code == 404:
                return "ended"
            if response.status_code != 200:
                return f"consume answered {response.status_code}: {response.text[:200]}"
            body = response.json()
            outputs = body.get("outputs") or []
            if not outputs:
                time.sleep(0.002)
                continue
            now = time.perf_counter()
            last_result = time.monotonic()
            for output, meta in zip(outputs, body.get("frames_metadata") or []):
                if output is not None:
                    rows.append(dict(at=now, frame_id=meta.get("frame_id"),
                                     signature=detections_signature(output.get("predictions"))))
    return "timed out"


def gpu_memory_by_process() -> Optional[Dict[int, float]]:
    """MiB of GPU memory per process (None where ``nvidia-smi`` is absent)."""
    if shutil.which("nvidia-smi") is None:
        return None
    text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30).stdout
    usage = {}
    for line in text.strip().splitlines():
        pid, _, used = line.partition(",")
        if pid.strip().isdigit():
            usage[int(pid)] = float(used)
    return usage


def run_pipelines(name: str, base: str, workflow: dict, videos: Sequence[str], model: str, frames: int,
                  warmup: int, expected: Optional[Dict[int, List[tuple]]] = None,
                  timeout_s: float = 540.0, gpus: int = 0, max_fps: Optional[float] = None,
                  excluded_fields: Sequence[str] = ()) -> Dict[str, Any]:
    """One pipeline per video through the stream API, each drained from the moment it is initialised.

    The manager starts pipelines one after another, seconds apart, and ends a pipeline (dropping what it
    still holds) once its file is read: a pipeline left undrained until the last one has started would
    lose its frames, and only the time after the last start measures M pipelines sharing the GPU.
    """
    import httpx

    ids: List[str] = []
    problems: List[List[str]] = []
    rows: List[List[Dict[str, Any]]] = [[] for _ in videos]
    completions: List[List[CompletionSample]] = [[] for _ in videos]
    stops: List[Optional[str]] = [None] * len(videos)
    memory: Dict[int, float] = {}
    threads: List[threading.Thread] = []

    def consume(index: int) -> None:
        stops[index] = drain(base, ids[index], rows[index], timeout_s, problems[index], completions[index],
                             excluded_fields)
        if stops[index] != "ended":  # the manager would keep it running into the next run
            with httpx.Client(timeout=30) as client:
                client.post(f"{base}/inference_pipelines/{ids[index]}/terminate")

    devices = round_robin_devices(len(videos), gpus) if gpus else [None] * len(videos)
    with httpx.Client(timeout=300) as client:
        for video, device in zip(videos, devices):
            spec = workflow if device is None else on_device(workflow, device)
            response = client.post(f"{base}/inference_pipelines/initialise", json=initialise_payload(video, spec, model, max_fps))
            if response.status_code != 200:
                raise RuntimeError(f"initialise answered {response.status_code}: {response.text[:300]}")
            ids.append(response.json()["context"]["pipeline_id"])
            problems.append([])
            threads.append(threading.Thread(target=consume, args=(len(ids) - 1,), daemon=True))
            threads[-1].start()
            await_sources(client, base, ids[-1], problems[-1])
        opened_at = time.perf_counter() + SETTLE_S
    own = os.getpid()  # this process's in-process reference run holds GPU memory too
    while any(t.is_alive() for t in threads):
        sample = gpu_memory_by_process()
        if sample:
            memory.update({pid: max(used, memory.get(pid, 0.0)) for pid, used in sample.items() if pid != own})
        time.sleep(1.0)
    pipelines, first, last, counted = [], [], [], 0
    for index, got in enumerate(rows):
        frame_ids = [r["frame_id"] for r in got]
        timed = got[warmup:]
        span = timed[-1]["at"] - timed[0]["at"] if len(timed) > 1 else 0.0
        if len(timed) > 1:
            first.append(timed[0]["at"])
            last.append(timed[-1]["at"])
            counted += len(timed) - 1
        differ = None if expected is None or "predictions" in excluded_fields else sum(r["signature"] != expected.get(r["frame_id"]) for r in got)
        pipelines.append(dict(pipeline_id=ids[index], delivered=len(got), lost=frames - len(got),
                              in_order=frame_ids == sorted(frame_ids) and len(set(frame_ids)) == len(frame_ids),
                              fps=(len(timed) - 1) / span if span > 0 else None,
                              results_differing_from_in_process=differ, stopped=stops[index],
                              source_problems=problems[index],
                              ended_without_a_frame=not got and stops[index] == "ended"))
    fps = counted / (max(last) - min(first)) if first and max(last) > min(first) else None
    together = all_running_rate(rows, warmup)
    processed = processing_rate(completions, opened_at)
    result = dict(name=name, pipelines=len(ids), max_fps=max_fps, consume_excluded_fields=list(excluded_fields), gpus=gpus or None, devices=devices if gpus else None, fps=fps,
                  fps_all_running=together["fps"], all_running_window_s=together["window_s"],
                  fps_all_running_per_pipeline=together["per_pipeline"],
                  fps_processed_all_running=processed["fps"], processed_window_s=processed["window_s"],
                  fps_processed_per_pipeline=processed["per_pipeline"],
                  frames=sum(p["delivered"] for p in pipelines), per_pipeline=pipelines, gpu_memory_mib_per_process=sorted(memory.values()) or None)
    shown = f"{fps:.1f}" if fps else "n/a"
    print(f"{name:>14} M={len(ids):<3} {shown:>8} fps aggregate, delivered {[p['delivered'] for p in pipelines]} "
          f"of {frames} each, differing {[p['results_differing_from_in_process'] for p in pipelines]}", flush=True)
    if together["fps"]:
        print(f"{'':>14} while all {len(ids)} ran ({together['window_s']:.1f} s): {together['fps']:.1f} fps aggregate, "
              f"per pipeline {[round(v, 1) for v in together['per_pipeline']]}", flush=True)
    else:
        print(f"{'':>14} the {len(ids)} pipelines never all ran at once (a longer clip, --frames, gives a window)",
              flush=True)
    if processed["fps"]:
        print(f"{'':>14} processed while all {len(ids)} ran ({processed['window_s']:.1f} s, the pipelines' own counters): "
              f"{processed['fps']:.1f} fps aggregate, per pipeline {[round(v, 1) for v in processed['per_pipeline']]}",
              flush=True)
    for index, pipeline in enumerate(pipelines):
        if pipeline["stopped"] != "ended":
            print(f"  pipeline {index} ({videos[index]}): stopped: {pipeline['stopped']}", flush=True)
        for problem in pipeline["source_problems"]:
            print(f"  pipeline {index} ({videos[index]}): {problem}", flush=True)
        if pipeline["ended_without_a_frame"] and not pipeline["source_problems"]:
            print(f"  pipeline {index} ({videos[index]}): ended without a frame; the manager kept no report of why",
                  flush=True)
    return result


def in_process_signatures(workflow: dict, video: str, model: str) -> Dict[int, List[tuple]]:
    """frame id -> detections signature of the same workflow run in this process."""
    from inference_fastpath.workflows.running import run_pipeline

    found: Dict[int, List[tuple]] = {}
    run_pipeline(video, workflow, {"model_id": model}, warmup_frames=0, keep_results=False,
                 on_result=lambda prediction, frame: found.__setitem__(
                     frame.frame_id, detections_signature(prediction.get("predictions"))))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    from inference_fastpath.examples.benchmarks.benchmark import truncated_clip
    from inference_fastpath.examples.benchmarks.scaling import parse_scaling_args, plot_scaling, scaling_parser

    parser = scaling_parser(__doc__.split("\n\n")[0], "--pipelines", "1,2,4", "pipeline", "stream_manager.json")
    parser.add_argument("--stock-pipelines", type=int, default=1, help="M for the stock v3 run (0: none)")
    parser.add_argument("--gpus", type=int, default=0,
                        help="spread our pipelines round-robin over this many GPUs through the block's device option "
                             "(0: leave `device` at auto); the stock pipelines stay on the current GPU")
    parser.add_argument("--max-fps", type=float, default=None,
                        help="play each file at this rate, as a camera would (every frame processed); "
                             "default: as fast as the pipeline goes")
    parser.add_argument("--exclude-from-consume", default="",
                        help="workflow outputs the server leaves out of each consumed result, comma list "
                             "(`predictions`: no masks serialised, no comparison with the in-process run)")
    parser.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"],
                        help="how the manager starts pipeline processes (its default: fork; spawn when the "
                             "manager process has initialised CUDA, see stream_manager_launch.py)")
    args, counts, name, options = parse_scaling_args(parser, argv, "--pipelines")

    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

    model = args.model or str(build_demo_model())
    results: List[Dict[str, Any]] = []
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as directory:
        clip = truncated_clip(args.video or str(default_clip_path()), args.frames, Path(directory), args.resolution)
        copies = [shutil.copy(clip, Path(directory) / f"copy{i}.mp4") for i in range(max(counts + [args.stock_pipelines]))]
        workflow = load_workflow(FASTPATH, **options)
        expected = in_process_signatures(workflow, clip, model)
        pool = max(counts + [args.stock_pipelines])
        with running_stream_api(out.with_name(out.stem + "-logs"), pool, args.start_method, pool) as (base, manager):
            if args.stock_pipelines:
                print(wait_for_idle_pool(manager, args.stock_pipelines), flush=True)
                results.append(run_pipelines("stock-v3", base, load_workflow(STOCK_V3), copies[:args.stock_pipelines],
                                             model, args.frames, args.warmup))
            for count in counts:
                print(wait_for_idle_pool(manager, count), flush=True)
                results.append(run_pipelines(name, base, workflow, copies[:count], model, args.frames, args.warmup,
                                             expected, gpus=args.gpus, max_fps=args.max_fps,
                                             excluded_fields=[f for f in args.exclude_from_consume.split(",") if f]))
    report = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "frames_per_pipeline": args.frames,
              "resolution": args.resolution or "native", "options": options, "decoding_buffer": DECODING_BUFFER,
              "start_method": args.start_method, "max_fps": args.max_fps,
              "results": results}
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {out}")
    plot_scaling(results, "pipelines", "pipelines (one process each) through the stream manager",
                 "RF-DETR-seg through the inference server's stream manager", str(out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
