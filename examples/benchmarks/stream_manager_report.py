"""What the stream-manager benchmark makes of what it saw: results that arrived over ``consume``, and
the pipelines' own completion counters from their status reports.

The two differ on purpose. ``consume`` hands out one result per request through a manager that serves
one command at a time for every pipeline, so it measures the delivery path; the completion counters
(streamvision's watchdog, ``completion_statistics`` in ``/inference_pipelines/{id}/status``) count the
frames each pipeline finished, whether or not anyone has fetched them yet, so they measure the GPU work.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

# (the benchmark's perf_counter when the report came back, the pipeline's own monotonic clock at the
# count, frames the pipeline had completed by then)
CompletionSample = Tuple[float, float, int]


def detections_signature(predictions: Any) -> List[tuple]:
    """(class, confidence to 4 places) per detection, from an ``sv.Detections`` or the server's
    JSON form of one: enough to tell one frame's result from another's."""
    if predictions is None:
        return []
    if isinstance(predictions, dict):
        return [(str(p.get("class")), round(float(p.get("confidence", 0.0)), 4))
                for p in predictions.get("predictions", [])]
    names = predictions.data.get("class_name", [None] * len(predictions))
    return [(str(name), round(float(confidence), 4)) for name, confidence in zip(names, predictions.confidence)]


def completed_frames(report: Dict[str, Any], clock_now: float) -> Optional[Tuple[float, int]]:
    """(the pipeline's clock, frames completed over all its sources) from a status report, or None when
    the report carries no completion statistics (older streamvision)."""
    statistics = report.get("completion_statistics")
    if not statistics:
        return None
    done = sum(int(source.get("completed_frames") or 0) for source in statistics.get("sources") or [])
    return float(statistics.get("sampled_at_monotonic", clock_now)), done


def all_running_rate(rows: Sequence[Sequence[Dict[str, Any]]], warmup: int) -> Dict[str, Any]:
    """Results per second while every pipeline was past its warm-up and still delivering.

    Pipelines that start seconds apart run alone for a while and finish alone; only this window
    measures M pipelines sharing the GPU.

    Example:
        >>> rows = [[{"at": t} for t in (0, 1, 2, 3, 4)], [{"at": t} for t in (2, 3, 4, 5)]]
        >>> all_running_rate(rows, warmup=0)
        {'fps': 2.0, 'window_s': 2.0, 'per_pipeline': [1.0, 1.0]}
    """
    starts = [got[warmup]["at"] for got in rows if len(got) > warmup]
    ends = [got[-1]["at"] for got in rows if len(got) > warmup]
    nothing = {"fps": None, "window_s": None, "per_pipeline": None}
    if len(starts) != len(rows) or not rows:
        return nothing
    start, end = max(starts), min(ends)
    if end <= start:
        return nothing
    # results strictly after the window opens: one pipeline's rate is (its results) / (the window)
    counts = [sum(1 for r in got if start < r["at"] <= end) for got in rows]
    window = float(end - start)
    return {"fps": sum(counts) / window, "window_s": window, "per_pipeline": [c / window for c in counts]}


def processing_rate(samples: Sequence[Sequence[CompletionSample]], opened_at: float) -> Dict[str, Any]:
    """Frames per second the pipelines completed while all of them ran, from their completion counters.

    The window opens at ``opened_at`` (the benchmark's clock: when the last pipeline was let go) and
    closes when the first pipeline's counter stops rising (its file is done). Each pipeline's rate is
    its counter's rise over its own clock inside the window; the aggregate is their sum.

    Example:
        >>> a = [(0.0, 10.0, 0), (1.0, 11.0, 100), (2.0, 12.0, 200), (3.0, 13.0, 200)]
        >>> b = [(0.0, 50.0, 0), (1.0, 51.0, 50), (2.0, 52.0, 100), (3.0, 53.0, 150)]
        >>> processing_rate([a, b], opened_at=0.5)
        {'fps': 150.0, 'window_s': 1.0, 'per_pipeline': [100.0, 50.0]}
    """
    nothing = {"fps": None, "window_s": None, "per_pipeline": None}
    if not samples or any(not series for series in samples):
        return nothing
    # a pipeline is done at the first report showing its final count
    closed_at = min(next(at for at, _, done in series if done == series[-1][2]) for series in samples)
    rates, spans = [], []
    for series in samples:
        inside = [sample for sample in series if opened_at <= sample[0] <= closed_at]
        if len(inside) < 2 or inside[-1][1] <= inside[0][1]:
            return nothing
        (_, clock0, done0), (_, clock1, done1) = inside[0], inside[-1]
        rates.append((done1 - done0) / (clock1 - clock0))
        spans.append(clock1 - clock0)
    return {"fps": sum(rates), "window_s": min(spans), "per_pipeline": rates}
