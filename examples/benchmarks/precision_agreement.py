"""How far fp16 / bf16 torch engines move the demo model's detections from the fp32 engine (GPU).

    python -m inference_fastpath.examples.benchmarks.precision_agreement --frames 30 --out precision.json

For each clip frame: the fp32 graph engine vs the fp16 graph engine, the bf16 graph engine and fp32
weights under fp16 autocast; detections come from inference-models' own ``post_process``. Prints, per
variant, detections found, how many fp32 detections have a same-class partner at box IoU >= 0.99 /
0.95 / 0.9, the median mask IoU of matched pairs and the largest raw logit / box differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from inference_fastpath.workflows.running import configure_environment

configure_environment()

import torch  # noqa: E402

VARIANTS = ("fp16", "bf16", "autocast-fp16")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def compare(reference, other, stats: Dict[str, list]) -> None:
    """Adds one frame's agreement figures to ``stats``."""
    stats["fp32_detections"].append(len(reference.xyxy))
    stats["variant_detections"].append(len(other.xyxy))
    if not len(reference.xyxy) or not len(other.xyxy):
        return
    iou = box_iou(reference.xyxy.float().cpu().numpy(), other.xyxy.float().cpu().numpy())
    iou *= reference.class_id.cpu().numpy()[:, None] == other.class_id.cpu().numpy()[None]
    best, partner = iou.max(1), iou.argmax(1)
    for bar in (0.99, 0.95, 0.9):
        stats[f"matched_iou_{bar}"].append(int((best >= bar).sum()))
    masks_a = reference.mask.cpu().numpy().astype(bool)
    masks_b = other.mask.cpu().numpy().astype(bool)
    for i in np.flatnonzero(best >= 0.9):
        a, b = masks_a[i], masks_b[partner[i]]
        stats["mask_iou"].append(float((a & b).sum() / max((a | b).sum(), 1)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--out", default="precision_agreement.json")
    parser.add_argument("--params", default=None,
                        help="trained_params.safetensors: the trained demo network instead of the random demo model")
    parser.add_argument("--video", default=None, help="clip to take the frames from (default: the bundled clip)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 0
    from inference_models import AutoModel

    from inference_fastpath.adapters.engine.base import materialize_outputs, outputs_as_model_results
    from inference_fastpath.adapters.engine.torch_engine import TorchEngine
    from inference_fastpath.adapters.contracts import PreprocessedBatch, RawOutputs
    from inference_fastpath.examples.demo_model import build_demo_model, default_clip_path
    from inference_fastpath.workflows.video_files import read_frames

    if args.params:
        import tempfile
        from pathlib import Path

        from inference_fastpath.examples.trained_demo import write_trained_package

        package = write_trained_package(Path(args.params), Path(tempfile.mkdtemp(prefix="precision-")) / "package")
    else:
        package = build_demo_model()
    model = AutoModel.from_pretrained(str(package), device=torch.device("cuda"))
    engines = {p: TorchEngine(model, precision=p, cuda_graphs=True) for p in ("fp32", "fp16", "bf16")}

    def outputs(variant: str, x: torch.Tensor):
        if variant == "autocast-fp16":
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                return tuple(t.float() for t in engines["fp32"].module(x))
        return materialize_outputs(engines[variant](PreprocessedBatch(tensor=x, metadata=[])))

    report: Dict[str, Dict[str, object]] = {}
    frames = read_frames(args.video or default_clip_path(), count=args.frames, step=max(1, 120 // args.frames))
    for variant in VARIANTS:
        stats: Dict[str, List[float]] = {k: [] for k in (
            "fp32_detections", "variant_detections", "matched_iou_0.99", "matched_iou_0.95", "matched_iou_0.9",
            "mask_iou", "max_logit_diff", "max_box_diff")}
        for frame in frames:
            x, meta = model.pre_process(frame)
            ref, out = outputs("fp32", x), outputs(variant, x)
            stats["max_logit_diff"].append(float((ref[1] - out[1]).abs().max()))
            stats["max_box_diff"].append(float((ref[0] - out[0]).abs().max()))
            detections = [model.post_process(outputs_as_model_results(RawOutputs(*o)), meta)[0] for o in (ref, out)]
            compare(*detections, stats)
        total = sum(stats["fp32_detections"])
        summary = {
            "fp32_detections": total,
            "variant_detections": sum(stats["variant_detections"]),
            **{k: sum(stats[k]) / max(total, 1) for k in stats if k.startswith("matched")},
            "median_mask_iou": float(np.median(stats["mask_iou"])) if stats["mask_iou"] else None,
            "max_logit_diff": max(stats["max_logit_diff"]),
            "max_box_diff": max(stats["max_box_diff"]),
        }
        report[variant] = summary
        print(variant, json.dumps(summary), flush=True)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "frames": len(frames), "model": args.params or "random demo",
                   "video": str(args.video or default_clip_path()), "variants": report}, handle, indent=2)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
