"""Many cameras on one GPU: one ``InferencePipeline`` over N video sources, for several N.

    python -m inference_fastpath.examples.benchmarks.many_sources --sources 1,4,8,16 --frames 100 \\
        --config "rle-d2:mask_output=rle,pipeline_depth=2" --out many_sources.json

Each source is a copy of the clip; odd sources play it mirrored, so a result handed to the wrong
source (or the wrong frame) shows up: every result is compared with the result of a one-source run
of the same variant, at the same frame id. Per N it reports the aggregate FPS (all results after
the warm-up over the time they took), each stream's FPS, frames delivered and dropped per stream,
whether each stream's frames came in order, mis-paired results, the latency from the frame's grab
by the decoder to its result (p50 / p99, ``camera_sources.py``) and the peak GPU memory. The stock v3
block runs the same setup once, at ``--stock-sources``, in the same run. By default no frame is
dropped (WAIT/LAZY buffering); ``--realtime 30`` plays every source like a 30 FPS camera with
live-stream buffering instead, and counts the streams that hold the rate (< 1% of frames dropped,
p99 latency < 100 ms). Writes JSON, a plot of FPS against N and the timeline of the largest N.
"""

from __future__ import annotations

import datetime
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from inference_fastpath.workflows.running import configure_environment

configure_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inference_fastpath.examples.benchmarks.camera_sources import TimedSource  # noqa: E402
from inference_fastpath.examples.benchmarks.benchmark import plot_timeline, truncated_clip  # noqa: E402
from inference_fastpath.examples.benchmarks.scaling import parse_scaling_args, plot_scaling, scaling_parser  # noqa: E402
from inference_fastpath.workflows.comparison import compare_detections, detections_distance  # noqa: E402
from inference_fastpath.workflows.video_files import read_frames, video_fps, write_clip  # noqa: E402



def source_variants(video: str, directory: Path) -> List[str]:
    """The clip as is and mirrored: sources alternate between them."""
    import cv2

    mirrored = [cv2.flip(image, 1) for image in read_frames(video)]
    return [video, str(write_clip(directory / "mirrored.mp4", mirrored, fps=video_fps(video)))]


def unusable_reason(video: str) -> Optional[str]:
    """Why ``video`` cannot be played (None: it opens and yields a frame). ``InferencePipeline``
    stops every stream when one source cannot be opened at the start, so such sources are left
    out of the run and reported, and the others keep going."""
    import cv2

    if not Path(video).exists():
        return f"{video}: no such file"
    capture = cv2.VideoCapture(video)
    try:
        if not capture.isOpened():
            return f"{video}: OpenCV cannot open it"
        if not capture.read()[0]:
            return f"{video}: no frame could be decoded"
    finally:
        capture.release()
    return None


def pairing_verdict(detections: Any, video: str, frame_id: int, expected: Dict[str, Dict[int, Any]]) -> Dict[str, Any]:
    """Is this result its own frame's? Its one-source result is the reference; the candidates it
    could have been swapped with are the same frame of every other source variant and the
    neighbouring frames of its own. It is mis-paired when one of those is closer to it than its
    own reference (or its reference is missing). ``equal``: within the strict parity tolerance of
    its reference, which a batch of N frames need not reach (other kernels, other rounding)."""
    own = expected[video].get(frame_id)
    if own is None:
        return {"mispaired": True, "equal": False, "own_distance_px": float("inf")}
    own_distance = detections_distance(detections, own)
    others = [expected[v].get(frame_id) for v in expected if v != video]
    others += [expected[video].get(frame_id + step) for step in (-1, 1)]
    closest_other = min((detections_distance(detections, o) for o in others if o is not None), default=float("inf"))
    equal = compare_detections(detections, own).within(confidence=1e-4, box_px=1.0, mask_iou=0.999)
    return {"mispaired": closest_other < own_distance, "equal": bool(equal), "own_distance_px": own_distance}


def dropped_after_warmup(delivered_ids: Sequence[int], grabbed: int, warmup: int) -> Optional[int]:
    """Frames a stream grabbed after its first counted result (the ``warmup``-th one, 0-based) that
    never came back: the steady-state drops of a live stream, apart from those while the engine
    warms up (first graph captures, first batches). ``None`` when no result is counted."""
    if len(delivered_ids) <= warmup:
        return None
    first = delivered_ids[warmup]
    expected = max(0, grabbed - first + 1)  # frame ids are 1-based grab numbers
    return max(0, expected - (len(delivered_ids) - warmup))


def graph_line(report: Dict[str, Any]) -> str:
    """One line of a runner's graph report: the measured run's batch sizes, each stage's captures."""
    sizes = report.get("batch_sizes_measured_run", report["batch_sizes"])
    stages = []
    for stage in ("preprocess", "engine", "postprocess"):
        summary = report.get(stage)
        if summary is not None:
            off = f", off: {summary['off_reason']}" if summary["off_reason"] else ""
            if summary.get("captures_stopped"):
                off += f", captures stopped: {summary['captures_stopped']}"
            ahead = summary.get("captured_ahead", 0)
            made = f"{summary['captures']} captures ({ahead} ahead)" if ahead else f"{summary['captures']} captures"
            stages.append(f"{stage} {made}/{summary['evictions']} evictions{off}")
    return f"batch sizes {sizes}; " + "; ".join(stages)


def holds_rate(stream: Dict[str, Any], realtime_fps: float, dropped_fraction: Optional[float],
               camera_clock: bool = True) -> bool:
    """Whether a live stream held ``realtime_fps``: under 1% of its frames dropped (``dropped_fraction``),
    p99 latency under 100 ms and at least 95% of the rate delivered. The rate is read on the camera's clock
    (``fps_camera_clock``) where the stream has one and ``camera_clock`` is set, else on the results' clock
    (``fps``).

    Example:
        >>> holds_rate({"latency_ms_p99": 60.0, "fps": 29.9}, 30.0, 0.0)
        True
        >>> holds_rate({"latency_ms_p99": 60.0, "fps": 29.9}, 30.0, 0.15)
        False
        >>> holds_rate({"latency_ms_p99": 60.0, "fps": 28.2, "fps_camera_clock": 29.9}, 30.0, 0.0)
        True
    """
    rate = stream.get("fps_camera_clock") if camera_clock else None
    rate = stream["fps"] if rate is None else rate
    return (dropped_fraction is not None and dropped_fraction < 0.01
            and stream["latency_ms_p99"] is not None and stream["latency_ms_p99"] < 100
            and rate is not None and rate >= 0.95 * realtime_fps)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if values else None


def run_sources(
    name: str,
    workflow: dict,
    videos: Sequence[str],
    model: str,
    warmup: int,
    frames_per_source: int,
    options: Optional[dict] = None,
    expected: Optional[Dict[str, Dict[int, Any]]] = None,
    keep: Optional[Dict[int, Any]] = None,
    realtime_fps: Optional[float] = None,
    stalls: Optional[Dict[int, Tuple[int, float]]] = None,
    batch_timeout: Optional[float] = None,
    with_times: bool = False,
    warm_results: int = 0,
    before_run: Optional[Callable[[], None]] = None,
    pinned_decode: bool = False,
) -> Dict[str, Any]:
    """One pipeline over ``videos``; ``expected[video][frame_id]`` are the one-source detections
    each result must equal; ``keep`` collects a one-source run's detections by frame id.
    ``realtime_fps``: every source plays like a camera at that rate, with live-stream buffering
    (frames the pipeline cannot take in time are dropped and counted). ``stalls[index] = (frames,
    seconds)`` freezes that source once; ``batch_timeout`` is how long a batch waits for a source.
    ``with_times`` adds ``times``: each stream's result times (``perf_counter``) and the latencies
    after the warm-up of all streams, to line up runs of several processes.
    ``warm_results``: before a live run, the same sources run at full speed until that many results per
    source came back (graphs of the run's batch size captured), as a service warms up before it takes
    cameras; the live run's figures then describe the warm service. ``before_run`` is called just
    before the measured run (after that pass), e.g. a start barrier shared by several processes.
    ``pinned_decode``: every source decodes into pinned frames (``camera_sources.py``), so our preprocess
    sends them without its staging fill."""
    from inference_fastpath.adapters.options import FastpathOptions
    from inference_fastpath.adapters.runner import RUNNERS
    from inference_fastpath.adapters.timeline import Timeline
    from inference_fastpath.workflows.running import run_pipeline

    RUNNERS.clear()
    runner = None
    if options is not None:
        runner = RUNNERS.get(model_id=model, options=FastpathOptions.from_values(options))
        runner.timeline = Timeline(runner.loaded.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    by_source: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    reasons = {index: unusable_reason(str(video)) for index, video in enumerate(videos)}
    playing = [index for index, reason in reasons.items() if reason is None]
    for index, reason in reasons.items():
        if reason is not None:
            print(f"source {index} left out of the run: {reason}", flush=True)
    sources = {index: TimedSource(videos[index], realtime_fps, (stalls or {}).get(index), pinned=pinned_decode)
               for index in playing}

    def on_result(prediction, frame) -> None:
        # only record: comparing inside the sink would slow the run being timed; the pipeline
        # numbers the sources it plays, which are `playing` in order
        by_source[playing[frame.source_id]].append(dict(frame_id=frame.frame_id, at=time.perf_counter(),
                                                        detections=prediction.get("predictions")))

    if not playing:
        raise ValueError(f"no source of {list(videos)} can be played: {list(reasons.values())}")
    warmed = 0
    if warm_results > 0:
        warm_sources = [TimedSource(videos[i], pinned=pinned_decode) for i in playing]
        warm_run = run_pipeline(warm_sources, workflow, {"model_id": model}, warmup_frames=0, keep_results=False,
                                stop_after=warm_results * len(playing), batch_collection_timeout=batch_timeout)
        warmed = len(warm_run.results)
    if before_run is not None:
        before_run()
    warm_batches = dict(runner.batch_sizes) if runner is not None else {}
    run = run_pipeline([sources[i] for i in playing], workflow, {"model_id": model},
                       warmup_frames=warmup * len(playing), on_result=on_result, keep_results=False,
                       buffering="live" if realtime_fps else "wait", batch_collection_timeout=batch_timeout)
    streams, latencies, mispaired, compared, equal, worst_px = [], [], 0, 0, 0, 0.0
    for source_id, video in enumerate(videos):
        rows = by_source.get(source_id, [])
        ids = [r["frame_id"] for r in rows]
        for row in rows:
            grabbed = sources[source_id].grabbed_at(row["frame_id"])  # rows exist only for playing sources
            row["latency_ms"] = None if grabbed is None else (row["at"] - grabbed) * 1e3
        own = [r["latency_ms"] for r in rows[warmup:] if r["latency_ms"] is not None]
        latencies.extend(own)
        if keep is not None and len(videos) == 1:
            keep.update({r["frame_id"]: r["detections"] for r in rows})
        if expected is not None and rows:
            for row in rows:
                compared += 1
                verdict = pairing_verdict(row["detections"], video, row["frame_id"], expected)
                mispaired += verdict["mispaired"]
                equal += verdict["equal"]
                worst_px = max(worst_px, verdict["own_distance_px"])
        span = rows[-1]["at"] - rows[min(warmup, len(rows) - 1)]["at"] if len(rows) > warmup + 1 else 0.0
        # the same count on the camera's clock (grab times of the first counted and the last delivered frame):
        # one late result at either end stretches `span` without any frame lost; drops and late results
        # are judged by the drop fraction and the p99 latency
        grabs = [sources[source_id].grabbed_at(rows[i]["frame_id"]) for i in (warmup, -1)] \
            if source_id in sources and len(rows) > warmup + 1 else [None, None]
        camera_span = grabs[1] - grabs[0] if None not in grabs else 0.0
        streams.append(dict(source_id=source_id, video=Path(video).name, unusable=reasons[source_id], delivered=len(rows),
                            last_result_at=rows[-1]["at"] if rows else None,
                            dropped=frames_per_source - len(rows), dropped_fraction=1 - len(rows) / frames_per_source,
                            dropped_after_warmup=None if source_id not in sources else dropped_after_warmup(
                                ids, sources[source_id].grabbed, warmup),
                            in_order=ids == sorted(ids) and len(set(ids)) == len(ids),
                            fps=(len(rows) - 1 - warmup) / span if span > 0 else None,
                            fps_camera_clock=(len(rows) - 1 - warmup) / camera_span if camera_span > 0 else None,
                            latency_ms_max=max(own) if own else None,
                            last_result_latency_ms=rows[-1]["latency_ms"] if rows else None,
                            latency_ms_p50=percentile(own, 50), latency_ms_p99=percentile(own, 99),
                            **(sources[source_id].pacing() if source_id in sources else {})))
        steady_drops = streams[-1]["dropped_after_warmup"]
        streams[-1]["dropped_after_warmup_fraction"] = (
            None if steady_drops is None else steady_drops / max(1, steady_drops + len(rows) - warmup))
    fps = run.fps_after_warmup()
    producers = [source.producer for source in sources.values() if source.producer is not None]
    result: Dict[str, Any] = {
        "name": name,
        "sources": len(videos),
        # pinned decode: frames decoded into pinned buffers / into ordinary memory (past the budget, no CUDA)
        "pinned_decode": pinned_decode,
        "decoded_pinned": sum(p.pooled_frames for p in producers) if pinned_decode else None,
        "decoded_unpinned": sum(p.other_frames for p in producers) if pinned_decode else None,
        "frames": sum(s["delivered"] for s in streams),
        "fps": fps,
        "fps_per_stream": fps / len(playing) if fps else None,
        "streams": streams,
        "all_frames_delivered_in_order": all(s["dropped"] == 0 and s["in_order"] for s in streams),
        "unusable_sources": [s["source_id"] for s in streams if s["unusable"]],
        "results_compared": compared,
        "results_mispaired": mispaired if expected is not None else None,
        "results_equal_to_one_source": equal if expected is not None else None,
        "largest_distance_to_own_one_source_px": worst_px if expected is not None else None,
        "realtime_fps": realtime_fps,
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p99": percentile(latencies, 99),
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "errors": run.errors,
        "wall_s": round(run.finished_at - run.started_at, 3),
        "warm_pass_results": warmed,
    }
    if realtime_fps:
        steady = [s for s in streams if s["dropped_after_warmup"] is not None]
        dropped = sum(s["dropped_after_warmup"] for s in steady)
        counted = sum(s["delivered"] - warmup for s in steady)
        result["dropped_after_warmup_fraction"] = dropped / max(1, dropped + counted) if steady else None
        # the rate is judged in steady state (drops after each stream's warm-up); the whole run's count,
        # the first graph captures' drops included, is reported beside it
        result["streams_holding_rate"] = sum(holds_rate(s, realtime_fps, s["dropped_after_warmup_fraction"])
                                             for s in streams)
        result["streams_holding_rate_including_warmup"] = sum(holds_rate(s, realtime_fps, s["dropped_fraction"])
                                                              for s in streams)
        # the earlier rule, the rate on the results' clock, kept beside it to show what the end of a clip costs
        result["streams_holding_rate_results_clock"] = sum(
            holds_rate(s, realtime_fps, s["dropped_after_warmup_fraction"], camera_clock=False) for s in streams)
        tails = [s["last_result_latency_ms"] for s in streams if s.get("last_result_latency_ms") is not None]
        result["last_result_latency_ms_max"] = max(tails) if tails else None
        # a stream can miss the rate because its camera's own thread (decode) fell behind the schedule:
        # counted apart, so the shortfall is laid at the right stage
        result["cameras_behind_schedule"] = sum(1 for s in streams if s.get("camera_fps") is not None
                                                and s["camera_fps"] < 0.95 * realtime_fps)
        late = [s["late_ms_max"] for s in streams if s.get("late_ms_max") is not None]
        result["camera_late_ms_max"] = max(late) if late else None
    if with_times:
        result["times"] = {"at": [[r["at"] for r in by_source.get(i, [])] for i in range(len(videos))],
                           "latency_ms": latencies}
    if runner is not None:
        # batch sizes of the measured run (its warm-up results' batches included), and each stage's graph
        # captures over the whole process: with a batch collection timeout, partial batches of changing
        # sizes show up here as captures
        report = runner.graph_report()
        report["batch_sizes_measured_run"] = {size: count - warm_batches.get(size, 0)
                                              for size, count in report["batch_sizes"].items()
                                              if count > warm_batches.get(size, 0)}
        result["graphs"] = report
        if runner.timeline is not None:
            result["timeline"] = runner.timeline.resolve()
    shown = f"{fps:.1f}" if fps else "n/a"
    p50, p99 = result["latency_ms_p50"], result["latency_ms_p99"]
    print(f"{name:>14} N={len(videos):<3} {shown:>8} fps aggregate, {result['frames']} results, "
          f"latency p50/p99 {p50 if p50 is None else round(p50, 1)}/{p99 if p99 is None else round(p99, 1)} ms, "
          f"mispaired {result['results_mispaired']}, equal to one-source {result['results_equal_to_one_source']} "
          f"(largest distance {result['largest_distance_to_own_one_source_px']} px), all delivered in order {result['all_frames_delivered_in_order']}",
          flush=True)
    if "graphs" in result:
        print(f"{'':>14} {graph_line(result['graphs'])}", flush=True)
    if realtime_fps:
        print(f"{'':>14} live at {realtime_fps} FPS: {sum(st['dropped'] for st in streams)} frames dropped in all, "
              f"fraction after warm-up {result['dropped_after_warmup_fraction']}, streams holding the rate "
              f"{result['streams_holding_rate']} of {len(streams)} after warm-up "
              f"({result['streams_holding_rate_including_warmup']} counting the warm-up's drops); cameras behind "
              f"their schedule {result['cameras_behind_schedule']} "
              f"(latest grab {result['camera_late_ms_max']} ms late); "
              f"on the results' clock {result['streams_holding_rate_results_clock']} hold, the last results up to "
              f"{result['last_result_latency_ms_max']} ms late",
              flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = scaling_parser(__doc__.split("\n\n")[0], "--sources", "1,4,8", "source", "many_sources.json")
    parser.add_argument("--stock-sources", type=int, default=None,
                        help="N for the stock v3 run (default: the smallest N; 0: no stock run)")
    parser.add_argument("--realtime", type=float, default=None, metavar="FPS",
                        help="play every source like a camera at FPS with live-stream buffering (drops counted)")
    parser.add_argument("--batch-timeout", type=float, default=None, metavar="S",
                        help="how long a batch waits for each source's frame (default: wait)")
    parser.add_argument("--warm-before-live", type=int, default=0, metavar="R",
                        help="with --realtime: first run the same sources at full speed for R results each, so "
                             "the cameras meet a warm service (default 0: they start with it)")
    parser.add_argument("--pinned-decode", action="store_true",
                        help="our runs decode every source into pinned frames: no staging fill in our preprocess")
    args, counts, name, options = parse_scaling_args(parser, argv, "--sources")
    if args.warm_before_live < 0 or (args.warm_before_live and not args.realtime):
        parser.error("--warm-before-live takes a count >= 0 and goes with --realtime")

    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows import FASTPATH, STOCK_V3, load_workflow

    model = args.model or str(build_demo_model())
    stock_sources = counts[0] if args.stock_sources is None else args.stock_sources
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as directory:
        clip = truncated_clip(args.video or str(default_clip_path()), args.frames, Path(directory), args.resolution)
        variants = source_variants(clip, Path(directory))
        workflow = load_workflow(FASTPATH, **options)
        expected: Dict[str, Dict[int, Any]] = {}
        for video in variants:  # one-source reference runs: what every stream's results must equal
            expected[video] = {}
            run_sources(f"{name}-reference", workflow, [video], model, args.warmup, args.frames, options,
                        keep=expected[video])
        if stock_sources:
            videos = [variants[i % 2] for i in range(stock_sources)]
            results.append(run_sources("stock-v3", load_workflow(STOCK_V3), videos, model, args.warmup, args.frames,
                                       realtime_fps=args.realtime, batch_timeout=args.batch_timeout))
        for count in counts:
            videos = [variants[i % 2] for i in range(count)]
            results.append(run_sources(name, workflow, videos, model, args.warmup, args.frames, options, expected,
                                       realtime_fps=args.realtime, batch_timeout=args.batch_timeout,
                                       warm_results=args.warm_before_live, pinned_decode=args.pinned_decode))
    largest = max((r for r in results if "timeline" in r), key=lambda r: r["sources"], default=None)
    report = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "frames_per_source": args.frames,
        "resolution": args.resolution or "native",
        "realtime_fps": args.realtime,
        "pinned_decode": args.pinned_decode,
        "options": options,
        "results": [{k: v for k, v in r.items() if k != "timeline"} for r in results],
    }
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {args.out}")
    plot_scaling(results, "sources", "sources in one InferencePipeline", "RF-DETR-seg, many sources on one GPU",
                 str(Path(args.out).with_suffix(".png")))
    if largest is not None and largest["timeline"]:
        plot_timeline(largest, str(Path(args.out).with_name(Path(args.out).stem + f"-timeline-N{largest['sources']}.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
