"""GPU microbenchmark of the RF-DETR segmentation postprocess.

Compares, per frame size and number of kept detections, the time to a host-side
result of:

* ``fused_dense`` / ``fused_rle``: ``FusedPostprocess`` (this package), dense bool
  masks / COCO RLE dicts on the host;
* ``ref_dense``: inference-models ``post_process_instance_segmentation_results`` +
  copying its masks (and boxes/scores) to the host;
* ``ref_rle``: inference-models ``post_process_instance_segmentation_results_to_rle_masks``
  (torch path);
* ``im_triton_rle``: the same call with inference-models' own Triton RLE postprocess
  (``INFERENCE_MODELS_RFDETR_TRITON_POSTPROC_ENABLED``);
* ``fused_rle_block`` / ``fused_dense_block``: ours up to the block's ``sv.Detections``;
* ``stock_like_block``: the stock v3 path after the model: the reference dense post_process,
  one polygon per mask, and each polygon re-rasterised into a full-frame mask (what the
  stock block's polygon output turns into inside a workflow);
* ``fused_gpu_rle`` / ``fused_gpu_dense``: device time of our captured postprocess graph
  alone (CUDA events around a replay).

Usage::

    python -m inference_fastpath.examples.benchmarks.bench_postprocess --out bench.json [--png bench.png]
    python -m inference_fastpath.examples.benchmarks.bench_postprocess --compile-check 90   # no GPU needed

Outputs are synthetic RF-DETR-seg-nano-like tensors ((1,100,4), (1,100,91),
(1,100,78,78)) with exactly N queries above the threshold. Every path is checked once
against the reference before timing (mismatches are reported in the table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

FRAMES = {"312": (312, 312), "720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}
KEPT = (1, 10, 50, 100)
NUM_CLASSES = 90
THRESHOLD = 0.5


def _outputs(n_kept: int, seed: int = 0):
    from inference_fastpath.adapters.postprocess.synthetic import synthetic_outputs

    raw = synthetic_outputs(n_confident=0, seed=seed, device="cpu")
    gen = torch.Generator().manual_seed(seed + 1)
    raw.logits.fill_(-12.0)  # background well below the threshold
    queries = torch.randperm(raw.logits.shape[1], generator=gen)[:n_kept]
    classes = torch.randint(0, NUM_CLASSES, (n_kept,), generator=gen)
    raw.logits[0, queries, classes] = torch.rand(n_kept, generator=gen) * 5 + 1.0
    return raw


def _timeit(fn: Callable[[], object], min_iters: int, budget_s: float) -> Dict[str, float]:
    torch.cuda.synchronize()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()  # every path returns host-side data, so it has synchronised by now
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": len(times)}


def run(frames: Dict[str, tuple], kept: tuple, budget_s: float, min_iters: int,
        only: Optional[List[str]] = None) -> List[Dict]:
    from inference_models.models.rfdetr import common

    from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs
    from inference_fastpath.adapters.contracts import detections_difference
    from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
    from inference_fastpath.adapters.postprocess.reference import ReferencePostprocess
    from inference_fastpath.adapters.postprocess.synthetic import make_metadata

    from inference_models.models.common.roboflow.model_packages import ClassNameRemoval
    from inference_models.models.rfdetr.class_remapping import prepare_class_remapping

    device = torch.device("cuda")
    # inference-models' Triton path only runs with a class remapping covering every
    # logit: name the "no object" logit and remove it, which keeps every path on the
    # usual semantics (ids >= NUM_CLASSES dropped)
    names = [f"class_{i}" for i in range(NUM_CLASSES)] + ["__no_object__"]
    removal = ClassNameRemoval(type="class_name_removal", class_name="__no_object__")
    _, remap = prepare_class_remapping(names, [removal], device)
    reference = ReferencePostprocess(num_classes=NUM_CLASSES, classes_re_mapping=remap)
    rows = []
    for frame_name, hw in frames.items():
        # one stage per frame size, as in a stream: its captured graphs (one per output shape)
        # stay within the stage's bounds instead of the benchmark's 32 shapes forcing eager runs
        stage = FusedPostprocess(NUM_CLASSES, remap, device)
        if stage.accumulation_mode() < 0:
            print("warning: fused resize arithmetic does not match torch on this device", file=sys.stderr)
        meta = [make_metadata(hw)]
        for n in kept:
            host = _outputs(n)
            raw = RawOutputs(boxes=host.boxes.to(device), logits=host.logits.to(device), masks=host.masks.to(device))
            dense_req = PostprocessRequest(THRESHOLD, None, "dense")
            rle_req = PostprocessRequest(THRESHOLD, None, "rle")

            def ref_dense():
                return reference(raw, meta, dense_req)

            def ref_rle():
                common._TRITON_POSTPROC_ENABLED = False
                return reference(raw, meta, rle_req)

            def im_triton_rle():
                common._TRITON_POSTPROC_ENABLED = True
                try:
                    return reference(raw, meta, rle_req)
                finally:
                    common._TRITON_POSTPROC_ENABLED = False

            image = _workflow_image(hw)
            paths = {
                "fused_dense": (lambda: stage(raw, meta, dense_req), ref_dense),
                "fused_rle": (lambda: stage(raw, meta, rle_req), ref_rle),
                "ref_dense": (ref_dense, None),
                "ref_rle": (ref_rle, None),
                "im_triton_rle": (im_triton_rle, ref_rle),
                # what the block hands to the workflow: sv.Detections with the standard keys
                "fused_dense_block": (lambda: _block_output(stage(raw, meta, dense_req), image), None),
                "fused_rle_block": (lambda: _block_output(stage(raw, meta, rle_req), image), None),
                "stock_like_block": (lambda: _stock_like_output(ref_dense(), image), None),
            }
            expected = {}
            for name, (fn, check) in paths.items():
                if only and name not in only:
                    continue
                row = {"frame": frame_name, "height": hw[0], "width": hw[1], "kept": n, "path": name}
                try:
                    if check is not None:
                        key = check.__name__
                        if key not in expected:
                            expected[key] = check()
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            got = fn()
                        if caught:
                            row["warnings"] = sorted({str(w.message)[:120] for w in caught})
                        problems = [detections_difference(a, b) for a, b in zip(got, expected[key])]
                        row["exact"] = all(p is None for p in problems)
                        if not row["exact"]:
                            row["mismatch"] = next(p for p in problems if p)
                    row.update(_timeit(fn, min_iters, budget_s))
                except Exception as error:  # keep benchmarking the other paths
                    row["error"] = f"{type(error).__name__}: {error}"
                rows.append(row)
                print(_format_row(row), flush=True)
            for name, request in (("fused_gpu_dense", dense_req), ("fused_gpu_rle", rle_req)):
                if only and name not in only:
                    continue
                stage(raw, meta, request)  # makes this shape's graph the last one
                row = {"frame": frame_name, "height": hw[0], "width": hw[1], "kept": n, "path": name}
                row.update(_time_device_program(stage))
                rows.append(row)
                print(_format_row(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def _workflow_image(hw):
    import numpy as np
    from inference.core.workflows.execution_engine.entities.base import ImageParentMetadata, WorkflowImageData

    return WorkflowImageData(parent_metadata=ImageParentMetadata(parent_id="bench"),
                             numpy_image=np.zeros((hw[0], hw[1], 3), dtype=np.uint8))


def _block_output(frames, image):
    from inference_fastpath.adapters.block_output import to_sv_detections

    names = [f"class_{i}" for i in range(NUM_CLASSES)]
    return [to_sv_detections(f, names, image, "bench") for f in frames]


def _stock_like_output(frames, image):
    """What the stock v3 block adds after inference-models' dense post_process: one polygon per
    mask (largest contour) and, in the workflow, each polygon re-rasterised to a full-frame mask."""
    import numpy as np
    import supervision as sv

    from inference_fastpath.adapters.masks import largest_external_contour

    out = []
    for frame in frames:
        height, width = frame.image_size
        polygons = [largest_external_contour(m) for m in frame.dense_masks]
        masks = np.zeros((len(polygons), height, width), dtype=bool)
        for i, polygon in enumerate(polygons):
            if len(polygon) >= 3:
                masks[i] = sv.polygon_to_mask(polygon.astype(int), (width, height)) > 0
        out.append(sv.Detections(xyxy=frame.xyxy.astype(float), confidence=frame.confidence,
                                 class_id=frame.class_id, mask=masks))
    return out


def _time_device_program(stage, iters: int = 50) -> Dict[str, float]:
    """Device time of the fused postprocess alone (graph replays between CUDA events)."""
    captured = stage.last_graph()
    if captured is None:
        return {"error": f"no captured graph ({stage.graph_fallback_reason})"}
    graph, stream = captured
    times = []
    with torch.cuda.stream(stream):
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def _format_row(row: Dict) -> str:
    if "error" in row:
        timing = f"ERROR {row['error'][:60]}"
    else:
        timing = f"{row['median_ms']:9.3f} ms (min {row['min_ms']:8.3f}, n={row['iters']})"
    exact = {True: "exact", False: "MISMATCH", None: ""}[row.get("exact")]
    notes = "; ".join(row.get("warnings", []))
    return f"{row['frame']:>6} {row['kept']:>4} {row['path']:<14} {timing} {exact} {notes}".rstrip()


def _table(rows: List[Dict]) -> str:
    paths = ["fused_gpu_rle", "fused_gpu_dense", "fused_dense", "ref_dense", "fused_rle", "ref_rle", "im_triton_rle",
             "fused_rle_block", "fused_dense_block", "stock_like_block"]
    lines = ["frame  kept " + " ".join(f"{p[-14:]:>14}" for p in paths)]
    keys = sorted({(r["frame"], r["kept"]) for r in rows}, key=lambda k: (list(FRAMES).index(k[0]), k[1]))
    for frame, kept in keys:
        cells = []
        for p in paths:
            r = next((r for r in rows if r["frame"] == frame and r["kept"] == kept and r["path"] == p), None)
            if r is None or "error" in r:
                cells.append(f"{'-' if r is None else 'err':>14}")
            else:
                flag = "!" if r.get("exact") is False else ""
                cells.append(f"{r['median_ms']:13.2f}{flag or ' '}")
        lines.append(f"{frame:>5} {kept:>5} " + " ".join(cells))
    lines.append("(median ms to host-side result, *_block: to the block's sv.Detections, fused_gpu_*: device time"
                 " of the captured postprocess graph; '!' = differs from the reference)")
    return "\n".join(lines)


def _plot(rows: List[Dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as error:  # matplotlib is optional
        return f"no chart ({error})"
    frames = [f for f in FRAMES if any(r["frame"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(frames), figsize=(4.5 * len(frames), 4), squeeze=False)
    for ax, frame in zip(axes[0], frames):
        for p in ["fused_gpu_rle", "fused_dense", "ref_dense", "fused_rle", "ref_rle", "im_triton_rle",
                  "fused_rle_block", "fused_dense_block", "stock_like_block"]:
            pts = sorted((r["kept"], r["median_ms"]) for r in rows if r["frame"] == frame and r["path"] == p and "median_ms" in r)
            if pts:
                ax.plot([k for k, _ in pts], [t for _, t in pts], marker="o", label=p)
        ax.set_title(frame)
        ax.set_xlabel("kept detections")
        ax.set_ylabel("ms (median, to host)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def compile_check(arch: int = 90) -> int:
    """Compile every fused-postprocess kernel variant for ``sm_<arch>`` without a GPU
    (Triton's bundled ptxas); catches compile errors a CPU interpreter run cannot."""
    import itertools
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET for --compile-check")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inference_fastpath.kernels import mask_resize as M
    from inference_fastpath.kernels import postprocess_mask_dense as D
    from inference_fastpath.kernels import postprocess_mask_rle as R
    from inference_fastpath.kernels import postprocess_rle_string as T
    from inference_fastpath.kernels import postprocess_select as S

    target = GPUTarget("cuda", arch, 32)
    grid_args = dict(Q="i32", mh="i32", mw="i32", crop_top="i32", crop_left="i32", crop_h="i32",
                     crop_w="i32", th="i32", tw="i32", oy="i32", ox="i32", Hc="i32", Wc="i32",
                     ytab="*fp32", xtab="*fp32", bin_ptr="*u8", sel_ptr="*i32")
    jobs = []
    for has_map, per_class in itertools.product([False, True], repeat=2):
        jobs.append((S._rank_kernel, dict(scores_ptr="*fp32", thr_ptr="*fp32", map_ptr="*i32", rank_ptr="*i32",
                                          QC="i32", C="i32", Q="i32", num_classes="i32", map_len="i32",
                                          thr_scalar="fp32"),
                     dict(HAS_MAP=has_map, PER_CLASS=per_class, CB=32, EB=256)))
        jobs.append((S._finalize_kernel, dict(scores_ptr="*fp32", boxes_ptr="*fp32", rank_ptr="*i32", map_ptr="*i32",
                                              params_ptr="*fp32", slots_ptr="*i32", out_ptr="*i32", QC="i32",
                                              C="i32", Q="i32", cap="i32", out_words="i32"),
                     dict(HAS_MAP=has_map, QP=128, EB=256)))
    for mode, taps in itertools.product(range(3), range(1, 4)):
        jobs.append((M._interp_float_kernel, dict(grid_ptr="*fp32", out_ptr="*fp32", mw="i32", crop_top="i32",
                                                  crop_left="i32", crop_h="i32", crop_w="i32", th="i32", tw="i32",
                                                  ytab="*fp32", xtab="*fp32"),
                     dict(MAXT=taps, MODE=mode, BLOCK=1024)))
    for src_bin, dtype, taps in itertools.product([False, True], ["*fp32", "*fp16", "*bf16"], [2, 3]):
        tile = dict(MAXT=taps, MODE=0, SRC_BIN=src_bin, WR=8, WC=16)
        jobs.append((D._extent_kernel, dict(grid_args, masks_ptr=dtype, n_out_ptr="*i32", ext_ptr="*i32"),
                     dict(tile, BY=64, BX=64)))
        jobs.append((D._dense_pack_kernel, dict(grid_args, masks_ptr=dtype, n_out_ptr="*i32", crops_ptr="*i32",
                                                 out_ptr="*u8", out_limit="i32"),
                     dict(tile, BY=32, BXB=16)))
        for emit in (False, True):
            jobs.append((R._rle_kernel, dict(grid_args, masks_ptr=dtype, n_out_ptr="*i32", counts_ptr="*i32",
                                             offsets_ptr="*i64", pos_ptr="*i32", pos_limit="i32"),
                         dict(tile, EMIT=emit, BX=32, BY=64)))
    for write in (False, True):
        jobs.append((T._rle_string_kernel, dict(pos_ptr="*i32", row_start_ptr="*i64", row_slots_ptr="*i32",
                                                row_pixels_ptr="*i64", row_bytes_ptr="*i64", row_offset_ptr="*i64",
                                                out_ptr="*u8", out_limit="i64"),
                     dict(WRITE=write, BLOCK=T.STRING_BLOCK, GROUPS=T.MAX_GROUPS)))
    failures = 0
    for fn, types, consts in jobs:
        signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                           options={"enable_fp_fusion": False, "num_warps": 4})
        except Exception as error:
            failures += 1
            print(f"FAIL {fn.__name__} {consts}: {type(error).__name__}: {str(error)[:400]}")
    print(f"compiled {len(jobs) - failures}/{len(jobs)} kernel variants for sm_{arch} (triton {triton.__version__})")
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_postprocess.json", help="JSON results path")
    parser.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    parser.add_argument("--frames", default=",".join(FRAMES), help="subset of " + ",".join(FRAMES))
    parser.add_argument("--kept", default=",".join(map(str, KEPT)))
    parser.add_argument("--budget-s", type=float, default=1.0, help="time budget per measurement")
    parser.add_argument("--min-iters", type=int, default=5)
    parser.add_argument("--paths", default="", help="comma list of paths to run (default: all)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH", default=None,
                        help="only compile all kernels for sm_ARCH (no GPU needed) and exit")
    args = parser.parse_args(argv)
    if args.compile_check is not None:
        return compile_check(args.compile_check)
    if not torch.cuda.is_available():
        print("bench_postprocess needs a CUDA GPU; nothing to do on this machine.")
        return 0
    frames = {k: FRAMES[k] for k in args.frames.split(",") if k}
    kept = tuple(int(k) for k in args.kept.split(",") if k)
    rows = run(frames, kept, args.budget_s, args.min_iters, [p for p in args.paths.split(",") if p])
    print()
    print(_table(rows))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)
    print(f"results: {args.out}")
    png = args.png or (args.out.rsplit(".", 1)[0] + ".png")
    print(f"chart: {_plot(rows, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
