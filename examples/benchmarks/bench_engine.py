"""GPU microbenchmark of the engine stage: eager vs CUDA-graph replay, fp32 vs fp16, batch 1/2/4.

For every (precision, batch size) it measures, on a randomly initialised RF-DETR-seg model (the
timings do not depend on the weights; ``--package`` benchmarks a real torch package instead):

* ``eager_ms`` / ``graph_ms`` - GPU time per call on the engine stream, calls issued back to back
  (CUDA events around a loop; host launch overhead shows up as GPU idle time between kernels);
* ``eager_lat_ms`` / ``graph_lat_ms`` - median latency of one call, host-synchronised each time;
* ``kernel_ms`` - summed GPU kernel (and memcpy/memset) time of one eager forward, from
  ``torch.profiler``: the floor a perfect launcher would reach;
* ``graph/kernel`` - replay time over kernel time (1.0 = no launch gaps left);
  ``eager/graph`` - speed-up of replay over eager.

Prints a table, writes JSON (``--out``) and a PNG next to it when matplotlib imports.

    python -m inference_fastpath.examples.benchmarks.bench_engine --out out/bench_engine.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from inference_fastpath.adapters.engine.base import EngineBase
from inference_fastpath.adapters.engine.torch_engine import TorchEngine, build_random_model
from inference_fastpath.adapters.contracts import PreprocessedBatch


def _call_and_release(engine: EngineBase, batch: PreprocessedBatch) -> None:
    raw = engine(batch)
    raw.release(None)


def time_pipelined(engine: EngineBase, batch: PreprocessedBatch, iters: int) -> float:
    """Mean GPU milliseconds per call with calls issued back to back."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(engine.stream)
    for _ in range(iters):
        _call_and_release(engine, batch)
    end.record(engine.stream)
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_latency(engine: EngineBase, batch: PreprocessedBatch, iters: int) -> float:
    """Median milliseconds of one call until its outputs are ready on the host side."""
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        raw = engine(batch)
        raw.done_event.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
        raw.release(None)
    return statistics.median(samples)


def kernel_time_ms(engine: EngineBase, batch: PreprocessedBatch, iters: int) -> float:
    """Summed device time of the CUDA kernels / memcpys / memsets of one call (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _call_and_release(engine, batch)
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total_us += event.time_range.elapsed_us()
    return total_us / 1e3 / iters


def bench_config(model: Any, precision: str, batch_size: int, iters: int, warmup: int) -> Dict[str, Any]:
    eager = TorchEngine(model, precision=precision, cuda_graphs=False)
    graph = TorchEngine(model, precision=precision, cuda_graphs=True)
    row: Dict[str, Any] = {"precision": precision, "batch": batch_size}
    for label, engine in (("eager", eager), ("graph", graph)):
        buffer = engine.input_buffer(batch_size)
        buffer.normal_()  # the preprocess would write here; graphs read it in place
        batch = PreprocessedBatch(tensor=buffer, metadata=[])
        for _ in range(warmup):
            _call_and_release(engine, batch)
        row[f"{label}_ms"] = time_pipelined(engine, batch, iters)
        row[f"{label}_lat_ms"] = time_latency(engine, batch, max(10, iters // 4))
        if label == "eager":
            row["kernel_ms"] = kernel_time_ms(engine, batch, max(3, iters // 20))
    row["graph_fallback_reason"] = graph.graph_fallback_reason
    row["graph_captures"] = graph.stats.captures
    row["graph_over_kernel"] = row["graph_ms"] / row["kernel_ms"] if row["kernel_ms"] else None
    row["eager_over_graph"] = row["eager_ms"] / row["graph_ms"] if row["graph_ms"] else None
    row["graph_ms_per_image"] = row["graph_ms"] / batch_size
    for engine in (eager, graph):
        engine.close()
    del eager, graph, engine
    gc.collect()  # engines and their graph runners reference each other
    torch.cuda.empty_cache()
    return row


def print_table(rows: List[Dict[str, Any]]) -> None:
    header = (
        f"{'prec':>5} {'batch':>5} {'eager ms':>9} {'graph ms':>9} {'kernel ms':>9} "
        f"{'graph/kern':>10} {'eager/graph':>11} {'eager lat':>9} {'graph lat':>9} {'ms/img':>7}"
    )
    print(header)
    print("-" * len(header))
    def fmt(value: Any, width: int, digits: int = 3) -> str:
        return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'n/a':>{width}}"

    for r in rows:
        print(
            f"{r['precision']:>5} {r['batch']:>5} {fmt(r['eager_ms'], 9)} {fmt(r['graph_ms'], 9)} "
            f"{fmt(r['kernel_ms'], 9)} {fmt(r['graph_over_kernel'], 10)} {fmt(r['eager_over_graph'], 11, 2)} "
            f"{fmt(r['eager_lat_ms'], 9)} {fmt(r['graph_lat_ms'], 9)} {fmt(r['graph_ms_per_image'], 7)}"
        )
        if r.get("graph_fallback_reason"):
            print(f"      graphs fell back to eager: {r['graph_fallback_reason']}")


def save_png(rows: List[Dict[str, Any]], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['precision']} b{r['batch']}" for r in rows]
    xs = range(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    for i, (key, name) in enumerate((("eager_ms", "eager"), ("graph_ms", "graph replay"), ("kernel_ms", "kernel sum"))):
        ax.bar([x + (i - 1) * width for x in xs], [r[key] for r in rows], width, label=name)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_ylabel("ms per call (GPU)")
    ax.set_title("RF-DETR-seg engine: eager vs CUDA graph")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="rfdetr-seg-nano", help="architecture for random weights")
    parser.add_argument("--package", default=None, help="a torch model package dir instead of random weights")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default="out/bench_engine.json", help="JSON result path (PNG beside it)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")

    device = torch.device("cuda")
    if args.package:
        from inference_models.models.rfdetr.rfdetr_instance_segmentation_pytorch import (
            RFDetrForInstanceSegmentationTorch,
        )

        model = RFDetrForInstanceSegmentationTorch.from_pretrained(args.package, device=device)
        source = args.package
    else:
        model = build_random_model(args.model_type, device=device, seed=0)
        source = f"{args.model_type} (random weights)"

    rows = []
    for precision in args.precisions.split(","):
        for batch_size in (int(b) for b in args.batches.split(",")):
            rows.append(bench_config(model, precision.strip(), batch_size, args.iters, args.warmup))
            print(f"done: {precision} batch {batch_size}", flush=True)
    print(f"\n{source} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    print_table(rows)

    result = {
        "model": source,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "iters": args.iters,
        "results": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    png = save_png(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
