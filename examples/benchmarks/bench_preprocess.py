"""Microbenchmark: fused Triton preprocess vs inference-models' preprocess paths (GPU host only).

    python -m inference_fastpath.examples.benchmarks.bench_preprocess --out bench.json

For every frame size (default 320x240, 768x576, 1920x1080, 3840x2160 -> 312x312, RF-DETR
stretch, ImageNet normalisation, BGR frames) it times:

* ``fastpath numpy``: our ``TritonPreprocess`` stage on a numpy frame (pinned staging + upload
  included), with its default upload: row chunks chosen from the frame size, each chunk's H2D
  copy overlapping the fill of the next (``auto_upload_chunks``);
* ``fastpath numpy 1-copy``: the same with ``upload_chunks=1`` (fill the whole frame, then one
  H2D copy: the upload before chunking);
* ``fastpath numpy 2-thread``: the default chunks filled by two worker threads
  (``upload_threads=2``);
* ``fastpath numpy pinned``: the same stage on a numpy frame that already lives in pinned memory
  (as ``pinned_video_source`` decodes them): one async copy, no staging fill;
* ``fastpath cuda``: the same stage on a CUDA uint8 frame already on the device;
* ``reference``: inference-models' RF-DETR ``pre_process_network_input`` (PIL on the CPU, then
  a copy to the GPU);
* ``im-triton numpy`` / ``im-triton cuda``: the Triton preprocess shipped in inference-models
  (``UniversalFastPreprocessRuntime``, the ``triton-universal-v1`` RF-DETR preprocessor, which
  applies to stretch models without static crop / contrast / grayscale).

``--sweep-upload`` also times the numpy upload alone (staging fill + H2D until its copy is done,
no kernel) for 1, 2, 4, 8 chunks and the automatic count, with 0 and 2 fill threads.

Two numbers per variant: ``latency`` (median of N calls, each waited for: host time until the
output is ready on the GPU) and ``throughput`` (K calls queued back to back, then one wait;
total / K). Warm-up calls come first (JIT compile, table upload, buffer allocation). Each row
also reports the max |difference| of the output against the reference. Results are printed as a
table and saved as JSON (``--out``), plus a PNG bar chart next to it when matplotlib imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_SIZES = ("320x240", "768x576", "1920x1080", "3840x2160")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# A call returns (output tensor, event to wait on or None when already synchronous).
Call = Callable[[], Tuple[torch.Tensor, Optional[torch.cuda.Event]]]


def _parse_size(text: str) -> Tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def _wait(event: Optional[torch.cuda.Event]) -> None:
    if event is not None:
        event.synchronize()
    torch.cuda.synchronize()


def _time_latency(call: Call, iters: int) -> List[float]:
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _, event = call()
        _wait(event)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _time_throughput(call: Call, iters: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    event = None
    for _ in range(iters):
        _, event = call()
    _wait(event)
    return (time.perf_counter() - start) * 1e3 / iters


def _adaptive_iters(call: Call, requested: int, budget_s: float) -> int:
    """Fewer iterations for slow variants (the CPU reference on 4K frames)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, event = call()
    _wait(event)
    once = time.perf_counter() - start
    return max(5, min(requested, int(budget_s / max(once, 1e-6))))


def _variants(frame: np.ndarray, target: int, device: torch.device) -> Dict[str, Call]:
    from inference_models.models.common.roboflow.model_packages import ImagePreProcessing
    from inference_models.models.rfdetr.pre_processing import pre_process_network_input
    from inference_models.models.rfdetr.triton_universal_preprocess_runtime import (
        UniversalFastPreprocessRuntime,
    )

    from inference_fastpath.adapters.preprocess.planning import stretch_network_input
    from inference_fastpath.adapters.preprocess.triton import TritonPreprocess

    network_input = stretch_network_input(target, target)
    preprocessing = ImagePreProcessing()
    frame_cuda = torch.from_numpy(frame).to(device)
    frame_pinned = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True).numpy()
    frame_pinned[...] = frame

    def make_stage(**upload):
        return TritonPreprocess(network_input, preprocessing, device, input_color_format="bgr", **upload)

    stage = make_stage()
    single_copy = make_stage(upload_chunks=1, upload_threads=0)
    two_threads = make_stage(upload_threads=2)
    im_runtime = UniversalFastPreprocessRuntime(device)
    im_stream = torch.cuda.Stream(device)

    def ours(source, stage=stage) -> Call:
        def call():
            batch = stage([source])
            return batch.tensor, batch.ready_event

        return call

    def reference():
        tensor, _ = pre_process_network_input(
            [frame], preprocessing, network_input, device, input_color_format="bgr"
        )
        return tensor, None

    def im_triton(source) -> Call:
        def call():
            result = im_runtime.preprocess(
                images=[source],
                input_color_format="bgr",
                image_pre_processing=preprocessing,
                network_input=network_input,
                pre_processing_overrides=None,
                stream=im_stream,
            )
            return result.tensor, result.ready_event

        return call

    return {
        "fastpath numpy": ours(frame),
        "fastpath numpy 1-copy": ours(frame, single_copy),
        "fastpath numpy 2-thread": ours(frame, two_threads),
        "fastpath numpy pinned": ours(frame_pinned),
        "fastpath cuda": ours(frame_cuda),
        "reference": reference,
        "im-triton numpy": im_triton(frame),
        "im-triton cuda": im_triton(frame_cuda),
    }


def _max_diff(call: Call, expected: torch.Tensor) -> float:
    tensor, event = call()
    _wait(event)
    return float((tensor.float() - expected.float()).abs().max().item())


def bench_size(
    size: Tuple[int, int], target: int, iters: int, warmup: int, budget_s: float, device: torch.device
) -> List[dict]:
    width, height = size
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    variants = _variants(frame, target, device)
    expected, _ = variants["reference"]()
    expected = expected.clone()
    rows = []
    for name, call in variants.items():
        try:
            for _ in range(warmup):
                _wait(call()[1])
            n = _adaptive_iters(call, iters, budget_s)
            samples = _time_latency(call, n)
            throughput = _time_throughput(call, n)
            diff = _max_diff(call, expected)
            error = None
        except Exception as exc:  # one variant failing must not hide the others
            samples, throughput, diff, n = [float("nan")], float("nan"), float("nan"), 0
            error = f"{type(exc).__name__}: {exc}"
        rows.append(
            dict(
                size=f"{width}x{height}",
                variant=name,
                iters=n,
                latency_ms_median=statistics.median(samples),
                latency_ms_p10=float(np.percentile(samples, 10)),
                latency_ms_p90=float(np.percentile(samples, 90)),
                throughput_ms=throughput,
                max_abs_diff_vs_reference=diff,
                error=error,
            )
        )
    return rows


def kernel_block_sweep(size: Tuple[int, int], target: int, iters: int, device: torch.device) -> List[dict]:
    """Kernel-only time of the fused resize+normalise for a few tile shapes (CUDA-event timed)."""
    from inference_fastpath.kernels.preprocess_resize_normalize import ResizeNormalizeOp
    from inference_fastpath.kernels.resize_coefficients import normalization_lut

    width, height = size
    src = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, device=device)
    out = torch.empty((3, target, target), device=device)
    lut = normalization_lut(MEAN, STD).to(device)
    rows = []
    for block in [(1, 128), (2, 64), (4, 64), (8, 32), (8, 64), (16, 32)]:
        op = ResizeNormalizeOp(device, pil_block=block)
        for _ in range(3):
            op.resize_normalize(src, out, lut, swap_rb=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            op.resize_normalize(src, out, lut, swap_rb=True)
        end.record()
        end.synchronize()
        rows.append(dict(size=f"{width}x{height}", block=list(block), kernel_ms=start.elapsed_time(end) / iters))
    return rows


def upload_sweep(
    size: Tuple[int, int], iters: int, warmup: int, device: torch.device
) -> List[dict]:
    """Numpy upload alone (fill + H2D, waited for), per chunk count and fill-thread count."""
    from inference_fastpath.adapters.preprocess.upload import Staging as _Staging

    width, height = size
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = torch.from_numpy(frame)
    stream = torch.cuda.Stream(device)
    rows = []
    for threads in (0, 2):
        for chunks in (1, 2, 4, 8, None):
            staging = _Staging(device, chunks=chunks, threads=threads)

            def call():
                with torch.cuda.stream(stream):  # upload sends on the current stream
                    (view,) = staging.upload([frame], stream=stream)
                done = torch.cuda.Event()
                done.record(stream)
                return view, done

            for _ in range(warmup):
                _wait(call()[1])
            view, done = call()
            _wait(done)
            exact = bool(torch.equal(view.cpu(), expected))
            samples = _time_latency(call, iters)
            rows.append(
                dict(
                    size=f"{width}x{height}",
                    chunks="auto" if chunks is None else chunks,
                    planned_chunks=len(staging.plan([frame])[2]),
                    threads=threads,
                    upload_ms_median=statistics.median(samples),
                    upload_ms_p10=float(np.percentile(samples, 10)),
                    upload_ms_p90=float(np.percentile(samples, 90)),
                    throughput_ms=_time_throughput(call, iters),
                    bytes_exact=exact,
                )
            )
    return rows


def _print_upload_sweep(rows: Sequence[dict]) -> None:
    if not rows:
        return
    header = f"{'size':>10}  {'chunks':>6} {'planned':>7} {'threads':>7} {'upload ms':>10} {'p10':>8} {'p90':>8} {'thrpt ms':>9}  exact"
    print()
    print("numpy upload alone (fill + H2D)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['size']:>10}  {str(row['chunks']):>6} {row['planned_chunks']:>7} {row['threads']:>7} "
            f"{row['upload_ms_median']:>10.3f} {row['upload_ms_p10']:>8.3f} {row['upload_ms_p90']:>8.3f} "
            f"{row['throughput_ms']:>9.3f}  {row['bytes_exact']}"
        )


def _print_table(rows: Sequence[dict]) -> None:
    header = f"{'size':>10}  {'variant':<24} {'latency ms':>11} {'p10':>8} {'p90':>8} {'thrpt ms':>9} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["error"]:
            print(f"{row['size']:>10}  {row['variant']:<24} failed: {row['error']}")
            continue
        print(
            f"{row['size']:>10}  {row['variant']:<24} {row['latency_ms_median']:>11.3f} "
            f"{row['latency_ms_p10']:>8.3f} {row['latency_ms_p90']:>8.3f} "
            f"{row['throughput_ms']:>9.3f} {row['max_abs_diff_vs_reference']:>10.2e}"
        )


def _save_chart(rows: Sequence[dict], path: Path, target: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    sizes = list(dict.fromkeys(row["size"] for row in rows))
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(10, 5))
    for index, variant in enumerate(variants):
        values = [
            next((r["latency_ms_median"] for r in rows if r["size"] == s and r["variant"] == variant), np.nan)
            for s in sizes
        ]
        positions = [i + (index - (len(variants) - 1) / 2) * width for i in range(len(sizes))]
        ax.bar(positions, values, width, label=variant)
    ax.set_xticks(range(len(sizes)), [f"{s} -> {target}x{target}" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("latency per frame, ms (median, log scale)")
    ax.set_title("RF-DETR preprocess latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="WxH frame sizes")
    parser.add_argument("--target", type=int, default=312, help="square network input size")
    parser.add_argument("--iters", type=int, default=100, help="timed calls per variant (max)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=3.0, help="time budget per variant")
    parser.add_argument("--sweep-blocks", action="store_true", help="also time kernel tile shapes")
    parser.add_argument(
        "--sweep-upload", action="store_true", help="also time the numpy upload alone per chunk / thread count"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON results path (PNG chart next to it)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_preprocess_resize_normalize: needs a CUDA GPU; nothing to measure on CPU.", file=sys.stderr)
        return 1

    device = torch.device("cuda", torch.cuda.current_device())
    rows: List[dict] = []
    sweep: List[dict] = []
    uploads: List[dict] = []
    for text in args.sizes:
        size = _parse_size(text)
        rows.extend(bench_size(size, args.target, args.iters, args.warmup, args.budget_s, device))
        if args.sweep_blocks:
            sweep.extend(kernel_block_sweep(size, args.target, args.iters, device))
        if args.sweep_upload:
            uploads.extend(upload_sweep(size, args.iters, args.warmup, device))
    _print_table(rows)
    _print_upload_sweep(uploads)
    for row in sweep:
        print(f"kernel tile {row['block']} {row['size']:>10}: {row['kernel_ms']:.4f} ms")

    if args.out is not None:
        import triton

        report = dict(
            device=torch.cuda.get_device_name(device),
            torch=torch.__version__,
            triton=triton.__version__,
            target=args.target,
            results=rows,
            kernel_tile_sweep=sweep,
            upload_sweep=uploads,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        chart = args.out.with_suffix(".png")
        if _save_chart(rows, chart, args.target):
            print(f"saved {args.out} and {chart}")
        else:
            print(f"saved {args.out} (matplotlib not importable: no chart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
