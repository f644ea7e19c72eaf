"""Evaluate an RF-DETR-seg demo package on held-out synthetic scenes, through its own inference path.

The package runs as users run it: ``RFDetrForInstanceSegmentationTorch.from_pretrained`` then
``pre_process(frames, input_color_format="rgb")`` -> ``forward`` -> ``post_process`` (confidence
0.4 by default). Predictions are matched to ground truth by mask IoU (Hungarian, class-agnostic,
a pair counts when IoU >= 0.5). Reported: mean IoU of matched pairs, class-correct recall per class
and overall (a ground-truth object matched by a prediction of its class), precision, detections
per frame, and COCO mask AP / AP50 (pycocotools, from detections at a low confidence), and recall/precision over a confidence sweep.

Scenes use seeds ``EVAL_SEED_BASE + j`` (disjoint from every training seed).

    python -m inference_fastpath.examples.training.evaluate_demo_model --params /tmp/run/trained_params.safetensors \\
        --scenes 200 --device cuda --out /tmp/run/eval.json
    python -m inference_fastpath.examples.training.evaluate_demo_model --package /path/to/package
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from inference_fastpath.examples.trained_demo import write_trained_package
from inference_fastpath.examples.training.train_demo_model import eval_scene_seed

IOU_THRESHOLD = 0.5
DEFAULT_CONFIDENCE = 0.4  # inference-models' RF-DETR default
AP_CONFIDENCE = 0.01  # AP needs the low-score tail too
SWEEP_CONFIDENCES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


# ---------------------------------------------------------------------------------------------
# package


def load_package(package_dir: Path, device: torch.device) -> Any:
    from inference_models.models.rfdetr.rfdetr_instance_segmentation_pytorch import (
        RFDetrForInstanceSegmentationTorch,
    )

    return RFDetrForInstanceSegmentationTorch.from_pretrained(str(package_dir), device=device)


# ---------------------------------------------------------------------------------------------
# matching


def mask_iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU between every (P, H, W) predicted and (N, H, W) ground-truth boolean mask -> (P, N)."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros((len(pred), len(gt)), np.float64)
    p = pred.reshape(len(pred), -1).astype(np.float32)
    g = gt.reshape(len(gt), -1).astype(np.float32)
    inter = (p @ g.T).astype(np.float64)  # float32 sums of 0/1 are exact up to 2**24 pixels
    union = p.sum(1, dtype=np.float64)[:, None] + g.sum(1, dtype=np.float64)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_by_mask_iou(pred: np.ndarray, gt: np.ndarray, threshold: float = IOU_THRESHOLD,
                      same_class: Optional[np.ndarray] = None) -> List[Tuple[int, int, float]]:
    """Hungarian matching maximising the total IoU of pairs at or above ``threshold`` (a pair below
    it counts as nothing, so it never displaces a valid match); among equal masks (one query
    reported for two classes) ``same_class`` (pred x gt bools) prefers the right class.

    Returns ``(pred_index, gt_index, iou)`` tuples sorted by ground-truth index.
    """
    iou = mask_iou_matrix(pred, gt)
    if iou.size == 0:
        return []
    gain = np.where(iou >= threshold, iou, 0.0)
    if same_class is not None:
        gain = gain + 1e-6 * (same_class & (iou >= threshold))
    rows, cols = linear_sum_assignment(-gain)
    pairs = [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] >= threshold]
    return sorted(pairs, key=lambda pair: pair[1])


class Tally:
    """Accumulates per-frame matches into the reported metrics."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.frames = 0
        self.predictions = 0
        self.gt_per_class = np.zeros(len(class_names), np.int64)
        self.hits_per_class = np.zeros(len(class_names), np.int64)  # matched with the right class
        self.matched = 0
        self.class_correct = 0
        self.ious: List[float] = []

    def add(self, pred_masks: np.ndarray, pred_classes: np.ndarray, gt_masks: np.ndarray, gt_classes: np.ndarray) -> None:
        self.frames += 1
        self.predictions += len(pred_masks)
        np.add.at(self.gt_per_class, np.asarray(gt_classes, np.int64), 1)
        same = np.asarray(pred_classes, np.int64)[:, None] == np.asarray(gt_classes, np.int64)[None, :]
        for p, g, iou in match_by_mask_iou(pred_masks, gt_masks, same_class=same):
            self.matched += 1
            self.ious.append(iou)
            if int(pred_classes[p]) == int(gt_classes[g]):
                self.class_correct += 1
                self.hits_per_class[int(gt_classes[g])] += 1

    def summary(self) -> Dict[str, Any]:
        gt_total = int(self.gt_per_class.sum())
        per_class = {
            name: {"gt": int(n), "recall": float(h / n) if n else None}
            for name, n, h in zip(self.class_names, self.gt_per_class, self.hits_per_class)
        }
        return {
            "frames": self.frames,
            "gt_objects": gt_total,
            "detections": self.predictions,
            "detections_per_frame": self.predictions / max(1, self.frames),
            "gt_per_frame": gt_total / max(1, self.frames),
            "matched": self.matched,
            "mean_matched_iou": float(np.mean(self.ious)) if self.ious else 0.0,
            "recall_any_class": self.matched / max(1, gt_total),
            "recall": self.class_correct / max(1, gt_total),
            "precision": self.class_correct / max(1, self.predictions),
            "class_accuracy_of_matched": self.class_correct / max(1, self.matched),
            "per_class": per_class,
        }


# ---------------------------------------------------------------------------------------------
# COCO mask AP


def coco_mask_ap(
    gts: Sequence[Tuple[np.ndarray, np.ndarray]],
    dets: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    num_classes: int,
) -> Optional[Dict[str, float]]:
    """COCO segm AP over frames: ``gts[i] = (masks, classes)``, ``dets[i] = (masks, classes, scores)``."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        return None

    def rle(mask: np.ndarray) -> Dict[str, Any]:
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode("ascii")
        return encoded

    images, annotations, results = [], [], []
    for image_id, ((gt_masks, gt_classes), (masks, classes, scores)) in enumerate(zip(gts, dets), start=1):
        height, width = gt_masks.shape[1:] if gt_masks.ndim == 3 else masks.shape[1:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for mask, cls in zip(gt_masks, gt_classes):
            encoded = rle(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1, "segmentation": encoded,
                "area": float(mask_utils.area(encoded)), "bbox": list(mask_utils.toBbox(encoded)), "iscrowd": 0,
            })
        for mask, cls, score in zip(masks, classes, scores):
            if int(cls) < num_classes:  # placeholder channels have no ground truth
                results.append({"image_id": image_id, "category_id": int(cls) + 1, "segmentation": rle(mask), "score": float(score)})
    if not annotations:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # COCO tools print progress
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations,
                        "categories": [{"id": i + 1, "name": str(i)} for i in range(num_classes)]}
        coco.createIndex()
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}


# ---------------------------------------------------------------------------------------------
# evaluation loop


def confidence_sweep(
    scene_class_names: Sequence[str],
    gts: Sequence[Tuple[np.ndarray, np.ndarray]],
    dets: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]],
    confidences: Sequence[float] = SWEEP_CONFIDENCES,
) -> List[Dict[str, Any]]:
    """Recall, precision and mean IoU at each confidence, from the low-confidence detections
    (post-processing keeps the same top-k at any confidence, so keeping ``score >= c`` of them
    is what ``post_process(confidence=c)`` returns)."""
    rows = []
    for confidence in confidences:
        tally = Tally(scene_class_names)
        for (gt_masks, gt_classes), (masks, classes, scores) in zip(gts, dets):
            keep = scores >= confidence
            tally.add(masks[keep], classes[keep], gt_masks, gt_classes)
        summary = tally.summary()
        rows.append({"confidence": confidence, **{k: summary[k] for k in (
            "recall", "precision", "recall_any_class", "mean_matched_iou", "detections_per_frame")}})
    return rows


def _scenes(count: int, first: int, resolution: int, scene_fn: Optional[Callable[[int], Any]]) -> List[Any]:
    if scene_fn is None:
        from inference_fastpath.examples.training.train_demo_model import RenderScene

        scene_fn = RenderScene(resolution)
    return [scene_fn(eval_scene_seed(first + j)) for j in range(count)]


def evaluate_package(
    model: Any,
    scene_class_names: Sequence[str],
    scenes: int = 200,
    first_scene: int = 0,
    batch: int = 8,
    confidence: float = DEFAULT_CONFIDENCE,
    resolution: int = 312,
    scene_fn: Optional[Callable[[int], Any]] = None,
    frames: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
    """Run ``model``'s pre_process/forward/post_process on held-out scenes (or on ``frames``:
    objects with ``image`` RGB, ``masks`` and ``classes``, e.g. :func:`clip_frames`) and score them."""
    if frames is not None:
        scenes = len(frames)
    tally = Tally(scene_class_names)
    gts: List[Tuple[np.ndarray, np.ndarray]] = []
    dets: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, scenes, batch):
        chunk = (list(frames[start:start + batch]) if frames is not None
                 else _scenes(min(batch, scenes - start), first_scene + start, resolution, scene_fn))
        images = [scene.image for scene in chunk]
        pre_processed, metadata = model.pre_process(images, input_color_format="rgb")
        raw = model.forward(pre_processed)
        kept = model.post_process(raw, metadata, confidence=confidence)
        low = model.post_process(raw, metadata, confidence=AP_CONFIDENCE)
        for scene, detections, loose in zip(chunk, kept, low):
            tally.add(detections.mask.cpu().numpy(), detections.class_id.cpu().numpy(), scene.masks, scene.classes)
            gts.append((scene.masks, scene.classes))
            dets.append((loose.mask.cpu().numpy(), loose.class_id.cpu().numpy(), loose.confidence.cpu().numpy()))
    result = tally.summary()
    result.update({"confidence": confidence, "iou_threshold": IOU_THRESHOLD})
    if frames is None:
        result["scene_seeds"] = [eval_scene_seed(first_scene), eval_scene_seed(first_scene + scenes - 1)]
    result["coco_segm"] = coco_mask_ap(gts, dets, len(scene_class_names))
    result["sweep"] = confidence_sweep(scene_class_names, gts, dets)
    return result


def clip_frames(clip: Path) -> List[Any]:
    """The frames of a shapes clip (decoded, RGB) with their ground truth (``make_clip --source shapes``)."""
    from types import SimpleNamespace

    import cv2

    from inference_fastpath.examples.make_clip import shapes_ground_truth_path
    from inference_fastpath.examples.training.synthetic_scenes import load_ground_truth
    from inference_fastpath.workflows.video_files import read_frames

    truth = load_ground_truth(shapes_ground_truth_path(clip))
    images = read_frames(str(clip))
    if len(images) != len(truth):
        raise ValueError(f"{clip} decodes to {len(images)} frames but its ground truth has {len(truth)}")
    return [SimpleNamespace(image=cv2.cvtColor(image, cv2.COLOR_BGR2RGB), masks=t.masks, classes=t.classes)
            for image, t in zip(images, truth)]


def format_table(result: Dict[str, Any]) -> str:
    lines = [f"{'class':<12}{'gt':>7}{'recall':>9}"]
    for name, row in result["per_class"].items():
        recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
        lines.append(f"{name:<12}{row['gt']:>7}{recall:>9}")
    lines.append(f"{'overall':<12}{result['gt_objects']:>7}{result['recall']:>9.3f}")
    lines.append(
        f"precision {result['precision']:.3f}  recall(any class) {result['recall_any_class']:.3f}  "
        f"mean matched IoU {result['mean_matched_iou']:.3f}  detections/frame {result['detections_per_frame']:.2f} "
        f"(gt {result['gt_per_frame']:.2f})"
    )
    if result.get("coco_segm"):
        coco = result["coco_segm"]
        lines.append(f"mask AP50 {coco['AP50']:.3f}  AP {coco['AP']:.3f}  AP75 {coco['AP75']:.3f}")
    if result.get("sweep"):
        lines.append("confidence  recall  precision  mean IoU  detections/frame")
        for row in result["sweep"]:
            lines.append(f"{row['confidence']:>10.2f}{row['recall']:>8.3f}{row['precision']:>11.3f}"
                         f"{row['mean_matched_iou']:>10.3f}{row['detections_per_frame']:>18.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a demo RF-DETR-seg package on held-out synthetic scenes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", type=Path, help="package directory (weights.pth + metadata files)")
    source.add_argument("--params", type=Path, help="trained_params.safetensors (package built in a temp dir)")
    parser.add_argument("--seed", type=int, default=None, help="network seed (default: from the params metadata)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--clip", type=Path, default=None,
                        help="evaluate on this shapes clip and its ground truth instead of held-out scenes")
    parser.add_argument("--first-scene", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: next to --params/--package)")
    args = parser.parse_args(argv)
    from inference_fastpath.examples.demo_network import RESOLUTION
    from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="demo-eval-") as tmp:
        package = args.package or write_trained_package(args.params, Path(tmp) / "package", seed=args.seed)
        model = load_package(package, device)
        result = evaluate_package(model, CLASS_NAMES, scenes=args.scenes, first_scene=args.first_scene,
                                  batch=args.batch, confidence=args.confidence, resolution=RESOLUTION,
                                  frames=clip_frames(args.clip) if args.clip else None)
    if args.clip:
        result["clip"] = str(args.clip)
    result["source"] = str(args.package or args.params)
    out = args.out or ((args.params.parent if args.params else args.package) / "eval.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"written {out}")


if __name__ == "__main__":
    main()
