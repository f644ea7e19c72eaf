"""Many cameras on one GPU from K processes: each runs one ``InferencePipeline`` over N sources.

    python -m inference_fastpath.examples.benchmarks.many_processes --processes 1,2,4 \\
        --sources-per-process 8 --frames 300 --warmup 10 --out many_processes.json

One process is bound by Python's GIL; K processes share the GPU, each with its own engine and CUDA
context. Per K, K spawned workers each build their one-source references of both clip variants (as
``many_sources`` does; also their warm-up: model load, graph capture), wait on one barrier so their
measured runs start together, run ``many_sources.run_sources`` over their N sources (plain and
mirrored clip alternating, each result checked against its own frame's reference) and send back
their results with their times (``perf_counter``: CLOCK_MONOTONIC, one clock for all processes on
Linux). Reported per K: the aggregate FPS in the common window (latest warm start of any process
to the earliest last result: all K past their warm-up and running), the naive aggregate
(counted results over the whole span), each stream's FPS in the window, frames delivered and
dropped, order, mis-paired results, latency p50 / p99 over all streams, each process's peak GPU
memory (PyTorch's allocator; ``nvidia-smi``'s, CUDA context and engine included, where it lists the
process) and with ``--realtime`` the streams holding the rate. The stock v3 block runs once, in one
process over ``--stock-sources`` sources. A failed process is reported with its error and its K
marked failed. Writes JSON and a plot of aggregate FPS against K.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import queue as queue_module
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from inference_fastpath.workflows.running import configure_environment

configure_environment()

from inference_fastpath.examples.benchmarks.many_sources import graph_line, percentile  # noqa: E402
from inference_fastpath.examples.benchmarks.scaling import parse_scaling_args, plot_scaling, scaling_parser  # noqa: E402

EXIT_GRACE_S = 5.0  # a process that has exited may still have its report in the pipe


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process runs: ``videos`` its sources, ``variants`` the clips it builds
    references of, ``warmup`` results per source not counted, ``frames`` per source; ``options``
    None runs the stock v3 workflow, without references."""

    name: str
    videos: Tuple[str, ...]
    variants: Tuple[str, ...]
    model: str
    warmup: int
    frames: int
    options: Optional[Dict[str, Any]]
    realtime_fps: Optional[float] = None
    barrier_timeout_s: float = 900.0
    warm_results: int = 0  # live runs: results per source of a full-speed pass first (many_sources.run_sources)
    pinned_decode: bool = False  # sources decode into pinned frames (many_sources.run_sources)
    batch_timeout: Optional[float] = None  # how long a batch waits for each source (None: for all of them)


def warm_bounds(stream_times: Sequence[Sequence[float]],
                warmup_results: int) -> Tuple[Optional[float], Optional[float]]:
    """(warm start, last result) of one process whose first ``warmup_results`` results (all streams,
    in time order) are its warm-up; (None, None) if none counts. The clock starts at the last
    warm-up result (the first result without a warm-up), so a batch's results, which arrive
    together, count over the interval since the batch before.

    >>> warm_bounds([[1.0, 3.0], [2.0, 4.0]], warmup_results=2)
    (2.0, 4.0)
    """
    times = sorted(t for stream in stream_times for t in stream)
    return (times[max(0, warmup_results - 1)], times[-1]) if len(times) > warmup_results else (None, None)


def common_window(warm_starts: Sequence[Optional[float]],
                  last_results: Sequence[Optional[float]]) -> Optional[Tuple[float, float]]:
    """(latest warm start, earliest last result): while every process is past its warm-up and none
    has finished. None when a process counted nothing or the window is empty.

    >>> common_window([1.0, 2.0], [5.0, 4.0])
    (2.0, 4.0)
    """
    if not warm_starts or None in warm_starts or None in last_results:
        return None
    start, end = max(warm_starts), min(last_results)
    return (start, end) if end > start else None


def count_in_window(times: Sequence[float], window: Tuple[float, float]) -> int:
    """Results after the window opens, up to its close: n results in it are n intervals' worth."""
    return sum(1 for t in times if window[0] < t <= window[1])


def common_window_fps(per_process_timestamps: Sequence[Sequence[float]], warm_starts: Sequence[Optional[float]],
                      last_results: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Aggregate results per second while all processes ran past their warm-up, and each one's share.

    >>> common_window_fps([[0, 1, 2, 3, 4], [2, 3, 4, 5]], warm_starts=[1, 2], last_results=[4, 5])
    {'fps': 2.0, 'window_s': 2.0, 'results': 4, 'per_process_fps': [1.0, 1.0]}
    """
    window = common_window(warm_starts, last_results)
    if window is None:
        return {"fps": None, "window_s": None, "results": 0, "per_process_fps": None}
    length = float(window[1] - window[0])
    counts = [count_in_window(times, window) for times in per_process_timestamps]
    return {"fps": sum(counts) / length, "window_s": length, "results": sum(counts),
            "per_process_fps": [count / length for count in counts]}


def naive_fps(per_process_timestamps: Sequence[Sequence[float]], warm_starts: Sequence[Optional[float]],
              last_results: Sequence[Optional[float]]) -> Optional[float]:
    """Every process's results after its own warm start over (latest last result - earliest warm
    start): it counts the stretches where fewer processes ran, so it is usually the lower figure.

    >>> naive_fps([[0, 1, 2, 3, 4], [2, 3, 4, 5]], warm_starts=[1, 2], last_results=[4, 5])
    1.5
    """
    pairs = [(times, warm) for times, warm in zip(per_process_timestamps, warm_starts) if warm is not None]
    ends = [last for last in last_results if last is not None]
    if not pairs or not ends:
        return None
    counted = sum(1 for times, warm in pairs for t in times if t > warm)
    span = max(ends) - min(warm for _, warm in pairs)
    return counted / span if span > 0 else None


def own_gpu_memory_mib() -> Optional[float]:
    """This process's GPU memory as ``nvidia-smi`` lists it (None without it, or where its pids are
    another namespace's, as in some containers)."""
    from inference_fastpath.examples.benchmarks.stream_manager import gpu_memory_by_process

    try:
        return (gpu_memory_by_process() or {}).get(os.getpid())
    except Exception:  # a failed query must not lose the run's report
        return None


def measure(spec: WorkerSpec, barrier: Any) -> Dict[str, Any]:
    """References (the warm-up), the barrier, then the measured run; the report sent to the parent."""
    import platform

    import torch

    from inference_fastpath.examples.benchmarks.many_sources import run_sources
    from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

    workflow = load_workflow(STOCK_V3) if spec.options is None else load_workflow(FASTPATH, **spec.options)
    expected: Optional[Dict[str, Dict[int, Any]]] = None
    if spec.options is not None:
        expected = {}
        for video in spec.variants:
            expected[video] = {}
            run_sources(f"{spec.name}-reference", workflow, [video], spec.model, spec.warmup, spec.frames, spec.options,
                        keep=expected[video])

    def start_together() -> None:
        try:
            barrier.wait(spec.barrier_timeout_s)
        except threading.BrokenBarrierError:
            raise RuntimeError("the start barrier broke: another process failed, or the start timed out") from None

    # with a warm pass, the processes meet at the barrier after it, so the measured runs still start together
    if not spec.warm_results:
        start_together()
    result = run_sources(spec.name, workflow, list(spec.videos), spec.model, spec.warmup, spec.frames, spec.options,
                         expected, realtime_fps=spec.realtime_fps, with_times=True, warm_results=spec.warm_results,
                         before_run=start_together if spec.warm_results else None, pinned_decode=spec.pinned_decode,
                         batch_timeout=spec.batch_timeout)
    times = result.pop("times")
    result.pop("timeline", None)  # large, and per process: not sent
    playing = len(spec.videos) - len(result["unusable_sources"])
    warm, last = warm_bounds(times["at"], spec.warmup * playing)
    return {"result": result, "at": times["at"], "latency_ms": times["latency_ms"], "warm_started_at": warm,
            "last_result_at": last, "peak_gpu_memory_mib": result["peak_gpu_memory_mib"],
            "gpu_memory_nvidia_smi_mib": own_gpu_memory_mib(), "pid": os.getpid(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}


def worker(index: int, spec: WorkerSpec, barrier: Any, reports: Any) -> None:
    """A spawned process's body: its report, or its error, always goes on ``reports``."""
    try:
        reports.put({"index": index, **measure(spec, barrier)})
    except BaseException as error:  # the parent waits for every process's word
        barrier.abort()  # the others stop waiting for this one
        reports.put({"index": index, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc()[-4000:]})


def run_processes(specs: Sequence[WorkerSpec], timeout_s: float) -> List[Dict[str, Any]]:
    """Runs one spawned worker per spec, their measured runs started together; their reports in spec
    order. A process that fails, exits without a word or outlives ``timeout_s`` gets an ``error``
    report; once one fails, the others have a few seconds to report, then all are terminated."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier, reports = context.Barrier(len(specs)), context.Queue()
    processes = [context.Process(target=worker, args=(i, spec, barrier, reports), name=f"{spec.name}-p{i}")
                 for i, spec in enumerate(specs)]
    received: Dict[int, Dict[str, Any]] = {}
    deadline, silent_since = time.monotonic() + timeout_s, None
    why_stopped = f"still running after {timeout_s:g} s: terminated"
    try:
        for process in processes:
            process.start()
        while len(received) < len(specs) and time.monotonic() < deadline:
            try:
                report = reports.get(timeout=0.5)
            except queue_module.Empty:
                if all(p.exitcode is not None for i, p in enumerate(processes) if i not in received):
                    silent_since = silent_since or time.monotonic()
                    if time.monotonic() - silent_since > EXIT_GRACE_S:
                        break
                continue
            received[report["index"]] = report
            if "error" in report and why_stopped.startswith("still"):
                barrier.abort()
                deadline = min(deadline, time.monotonic() + 2 * EXIT_GRACE_S)
                why_stopped = f"terminated after process {report['index']} failed"
    finally:
        terminated = set()
        for index, process in enumerate(processes):
            process.join(timeout=EXIT_GRACE_S if index in received else 0)
            if process.is_alive():
                terminated.add(index)
                process.terminate()
                process.join(timeout=EXIT_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
    for index, process in enumerate(processes):
        if index not in received:
            why = why_stopped if index in terminated else f"exited with code {process.exitcode} without a report"
            received[index] = {"index": index, "error": why}
    return [received[i] for i in range(len(specs))]


def aggregate(name: str, reports: Sequence[Dict[str, Any]], sources_per_process: int,
              realtime_fps: Optional[float]) -> Dict[str, Any]:
    """One K's record from its processes' reports (in process order)."""
    record: Dict[str, Any] = {"name": name, "processes": len(reports), "sources_per_process": sources_per_process,
                              "sources": len(reports) * sources_per_process}
    errors = [f"process {r['index']}: {r['error']}" for r in reports if "error" in r]
    if errors:
        return {**record, "failed": True, "process_errors": errors, "fps": None,
                "tracebacks": [r.get("traceback") for r in reports if "error" in r],
                "per_process": [r.get("result") for r in reports]}
    results = [r["result"] for r in reports]
    flat = [[t for stream in r["at"] for t in stream] for r in reports]
    warm, last = [r["warm_started_at"] for r in reports], [r["last_result_at"] for r in reports]
    window = common_window_fps(flat, warm, last)
    bounds = common_window(warm, last)
    stream_fps = None if bounds is None else [count_in_window(s, bounds) / window["window_s"]
                                              for r in reports for s in r["at"]]
    latencies = [v for r in reports for v in r["latency_ms"]]
    streams = [s for result in results for s in result["streams"]]
    mispaired = [result["results_mispaired"] for result in results]
    record.update(
        failed=False, fps=window["fps"], window_s=window["window_s"], window_results=window["results"],
        fps_per_process=window["per_process_fps"], fps_naive=naive_fps(flat, warm, last),
        fps_per_stream=None if stream_fps is None else window["fps"] / len(stream_fps),
        stream_fps_in_window=stream_fps, frames=sum(s["delivered"] for s in streams),
        dropped=sum(s["dropped"] for s in streams), all_in_order=all(s["in_order"] for s in streams),
        all_frames_delivered_in_order=all(r["all_frames_delivered_in_order"] for r in results),
        results_mispaired=None if None in mispaired else sum(mispaired),
        latency_ms_p50=percentile(latencies, 50), latency_ms_p99=percentile(latencies, 99),
        peak_gpu_memory_mib_per_process=[r["peak_gpu_memory_mib"] for r in reports],
        gpu_memory_nvidia_smi_mib_per_process=[r["gpu_memory_nvidia_smi_mib"] for r in reports],
        process_spans_s=None if None in warm + last else [[w - min(warm), e - min(warm)] for w, e in zip(warm, last)],
        realtime_fps=realtime_fps, per_process=results)
    if realtime_fps:
        record["streams_holding_rate"] = sum(result["streams_holding_rate"] for result in results)
        record["streams_holding_rate_including_warmup"] = sum(
            result.get("streams_holding_rate_including_warmup", 0) for result in results)
        record["cameras_behind_schedule"] = sum(result.get("cameras_behind_schedule", 0) for result in results)
        record["streams_holding_rate_results_clock"] = sum(
            result.get("streams_holding_rate_results_clock", 0) for result in results)
        tails = [result["last_result_latency_ms_max"] for result in results
                 if result.get("last_result_latency_ms_max") is not None]
        record["last_result_latency_ms_max"] = max(tails) if tails else None
    return record


def describe(record: Dict[str, Any]) -> str:
    """The line printed per K."""
    head = f"{record['name']:>14} K={record['processes']:<2} N={record['sources_per_process']:<3}"
    if record["failed"]:
        return f"{head} FAILED: " + "; ".join(record["process_errors"])

    def shown(value: Optional[float], digits: int = 1) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    line = (f"{head} {shown(record['fps']):>8} fps aggregate in the common window ({shown(record['window_s'], 2)} s; "
            f"naive {shown(record['fps_naive'])}), {record['frames']} results, {record['dropped']} dropped, latency "
            f"p50/p99 {shown(record['latency_ms_p50'])}/{shown(record['latency_ms_p99'])} ms, mispaired "
            f"{record['results_mispaired']}, in order {record['all_in_order']}, all delivered in order "
            f"{record['all_frames_delivered_in_order']}, peak "
            f"GPU MiB per process {[m if m is None else round(m) for m in record['peak_gpu_memory_mib_per_process']]}")
    if record["realtime_fps"]:
        line += (f", streams holding {record['realtime_fps']} FPS: {record['streams_holding_rate']} of {record['sources']} "
                 f"after warm-up ({record['streams_holding_rate_including_warmup']} counting the warm-up's drops), "
                 f"cameras behind their schedule {record.get('cameras_behind_schedule')}; on the results' clock "
                 f"{record.get('streams_holding_rate_results_clock')} hold, the last results up to "
                 f"{shown(record.get('last_result_latency_ms_max'))} ms late")
    graphs = [result.get("graphs") for result in record["per_process"]]
    if any(graphs):
        line += "; per process: " + " | ".join(graph_line(g) for g in graphs if g)
    return line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = scaling_parser(__doc__.split("\n\n")[0], "--processes", "1,2,4", "process", "many_processes.json",
                            per="source")
    parser.add_argument("--sources-per-process", type=int, default=8, help="N: sources in each process's pipeline")
    parser.add_argument("--stock-sources", type=int, default=None,
                        help="sources of the stock v3 run, one process (default: N; 0: no stock run)")
    parser.add_argument("--realtime", type=float, default=None, metavar="FPS",
                        help="play every source like a camera at FPS with live-stream buffering (drops counted)")
    parser.add_argument("--warm-before-live", type=int, default=0, metavar="R",
                        help="with --realtime: each process first runs its sources at full speed for R results "
                             "each, so the cameras meet a warm service (default 0: they start with it)")
    parser.add_argument("--batch-timeout", type=float, default=None, metavar="S",
                        help="how long a batch waits for each source's frame (default: wait for every source); "
                             "with --realtime, batches then come partial, as live deployments set them")
    parser.add_argument("--pinned-decode", action="store_true",
                        help="our runs decode every source into pinned frames: no staging fill in our preprocess")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="S",
                        help="seconds one K may take, process start to last result; stragglers are terminated")
    args, counts, name, options = parse_scaling_args(parser, argv, "--processes")
    if args.sources_per_process < 1:
        parser.error(f"--sources-per-process must be >= 1, got {args.sources_per_process}")
    if args.warm_before_live < 0 or (args.warm_before_live and not args.realtime):
        parser.error("--warm-before-live takes a count >= 0 and goes with --realtime")
    if args.batch_timeout is not None and args.batch_timeout < 0:
        parser.error(f"--batch-timeout takes seconds >= 0, got {args.batch_timeout}")

    from inference_fastpath.examples.benchmarks.benchmark import truncated_clip
    from inference_fastpath.examples.benchmarks.many_sources import source_variants
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path

    model = args.model or str(build_demo_model())
    per = args.sources_per_process
    stock_sources = per if args.stock_sources is None else args.stock_sources
    records: List[Dict[str, Any]] = []
    reports_seen: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        clip = truncated_clip(args.video or str(default_clip_path()), args.frames, Path(directory), args.resolution)
        variants = tuple(source_variants(clip, Path(directory)))
        runs = [("stock-v3", 1, stock_sources, None)] if stock_sources else []
        runs += [(name, count, per, options) for count in counts]
        for run_name, count, sources, run_options in runs:
            specs = [WorkerSpec(run_name, tuple(variants[(k * sources + i) % 2] for i in range(sources)),
                                variants, model, args.warmup, args.frames, run_options, args.realtime, args.timeout,
                                warm_results=args.warm_before_live if run_options is not None else 0,
                                pinned_decode=args.pinned_decode and run_options is not None,
                                batch_timeout=args.batch_timeout)
                     for k in range(count)]
            reports = run_processes(specs, args.timeout)
            reports_seen += [r for r in reports if "error" not in r]
            records.append(aggregate(run_name, reports, sources, args.realtime))
            print(describe(records[-1]), flush=True)
    first = reports_seen[0] if reports_seen else {}  # the parent stays off the GPU: the workers name it
    report = dict(created=datetime.datetime.now().isoformat(timespec="seconds"), device=first.get("device"),
                  torch=first.get("torch"), frames_per_source=args.frames, resolution=args.resolution or "native",
                  realtime_fps=args.realtime, pinned_decode=args.pinned_decode,
                  batch_timeout_s=args.batch_timeout, options=options, results=records)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {args.out}")
    plot_scaling(records, "processes", f"processes, each one InferencePipeline over {per} sources",
                 "RF-DETR-seg, many processes on one GPU", str(Path(args.out).with_suffix(".png")))
    return 1 if any(r["failed"] for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
