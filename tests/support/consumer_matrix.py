"""The compact-mask consumer matrix: every stock block that takes instance-segmentation predictions,
fed by our block, and a runner that executes one variant (``mask_output``) in its own process.

Trackers number their tracks from process-wide counters, so each variant runs in a fresh process
(``run_variant`` through a spawned pool) and returns plain data: images as arrays, detections as their
fields with dense masks, and how often the step converted compact masks to dense ones.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Dict, List

import numpy as np
import supervision as sv
from supervision.detection.compact_mask import CompactMask

P = "$steps.seg.predictions"
IMAGE = "$inputs.image"
ZONE = [[40, 40], [700, 40], [700, 520], [40, 520]]
FILTER = [{"type": "DetectionsFilter", "filter_operation": {"type": "StatementGroup", "operator": "and", "statements": [
    {"type": "BinaryStatement", "left_operand": {"type": "DynamicOperand", "operations": [
        {"type": "ExtractDetectionProperty", "property_name": "confidence"}]},
     "comparator": {"type": "(Number) >="}, "right_operand": {"type": "StaticOperand", "value": 0.5}}]}}]


CONFIDENT = [{**FILTER[0], "filter_operation": {**FILTER[0]["filter_operation"], "statements": [
    {**FILTER[0]["filter_operation"]["statements"][0], "right_operand": {"type": "StaticOperand", "value": 0.8}}]}}]


def consumers() -> List[Dict[str, Any]]:
    viz = ["background_color", "blur", "bounding_box", "circle", "color", "corner", "crop", "dot", "ellipse",
           "heatmap", "mask", "pixelate", "triangle"]
    steps = [{"type": f"roboflow_core/{name}_visualization@v1", "name": f"viz_{name}", "image": IMAGE,
              "predictions": P} for name in viz]
    for name, versions in (("halo", (1, 2)), ("label", (1, 2)), ("polygon", (1, 2))):
        steps += [{"type": f"roboflow_core/{name}_visualization@v{v}", "name": f"viz_{name}_v{v}", "image": IMAGE,
                   "predictions": P} for v in versions]
    steps += [
        {"type": "roboflow_core/model_comparison_visualization@v1", "name": "viz_comparison", "image": IMAGE,
         "predictions_a": P, "predictions_b": "$steps.filter.predictions"},
        {"type": "fastpath/mask_visualization@v1", "name": "viz_fastpath_mask", "image": IMAGE, "predictions": P},
        # trackers
        {"type": "roboflow_core/byte_tracker@v1", "name": "byte_v1", "metadata": "$inputs.video", "detections": P},
        {"type": "roboflow_core/byte_tracker@v2", "name": "byte_v2", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/byte_tracker@v3", "name": "byte_v3", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/trackers_bytetrack@v1", "name": "trk_bytetrack", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/trackers_sort@v1", "name": "trk_sort", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/trackers_ocsort@v1", "name": "trk_ocsort", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/trackers_botsort@v1", "name": "trk_botsort", "image": IMAGE, "detections": P},
        {"type": "roboflow_core/stabilize_detections@v1", "name": "stabilize", "image": IMAGE,
         "detections": "$steps.byte_v3.tracked_detections"},
        {"type": "roboflow_core/trace_visualization@v1", "name": "viz_trace", "image": IMAGE,
         "predictions": "$steps.byte_v3.tracked_detections"},
        {"type": "roboflow_core/velocity@v1", "name": "velocity", "image": IMAGE,
         "detections": "$steps.byte_v3.tracked_detections"},
        # transformations
        {"type": "roboflow_core/detections_filter@v1", "name": "filter", "predictions": P, "operations": FILTER},
        {"type": "roboflow_core/detections_transformation@v1", "name": "transformation", "predictions": P,
         "operations": FILTER},
        {"type": "roboflow_core/dynamic_crop@v1", "name": "crop", "images": IMAGE, "predictions": P},
        # the stitch chain: crops of the most confident detections, segmented again, stitched back
        {"type": "roboflow_core/detections_filter@v1", "name": "confident", "predictions": P, "operations": CONFIDENT},
        {"type": "roboflow_core/dynamic_crop@v1", "name": "confident_crops", "images": IMAGE,
         "predictions": "$steps.confident.predictions"},
        {"type": "fastpath/rfdetr_instance_segmentation@v1", "name": "seg_crops", "images": "$steps.confident_crops.crops",
         "model_id": "$inputs.model_id", "preprocess": "reference", "postprocess": "reference", "mask_output": None},
        {"type": "roboflow_core/detections_stitch@v1", "name": "stitch", "reference_image": IMAGE,
         "predictions": "$steps.seg_crops.predictions", "overlap_filtering_strategy": "none"},
        {"type": "roboflow_core/detection_offset@v1", "name": "offset", "predictions": P, "offset_width": 10,
         "offset_height": 10},
        {"type": "roboflow_core/bounding_rect@v1", "name": "bounding_rect", "predictions": P},
        {"type": "roboflow_core/detections_merge@v1", "name": "merge", "predictions": P},
        {"type": "roboflow_core/dynamic_zone@v1", "name": "dynamic_zone", "predictions": P,
         "required_number_of_vertices": 4},
        {"type": "roboflow_core/overlap_analysis@v1", "name": "overlap_analysis", "reference_predictions": P,
         "candidate_predictions": "$steps.filter.predictions"},
        {"type": "roboflow_core/detections_combine@v1", "name": "combine", "prediction_one": P, "prediction_two": P},
        # analytics
        {"type": "roboflow_core/time_in_zone@v1", "name": "zone_v1", "image": IMAGE, "metadata": "$inputs.video",
         "detections": "$steps.byte_v1.tracked_detections", "zone": ZONE},
        {"type": "roboflow_core/time_in_zone@v2", "name": "zone_v2", "image": IMAGE,
         "detections": "$steps.byte_v3.tracked_detections", "zone": ZONE},
        {"type": "roboflow_core/time_in_zone@v3", "name": "zone_v3", "image": IMAGE,
         "detections": "$steps.byte_v3.tracked_detections", "zone": ZONE},
        {"type": "roboflow_core/line_counter@v1", "name": "line_v1", "metadata": "$inputs.video",
         "detections": "$steps.byte_v1.tracked_detections", "line_segment": [[0, 288], [768, 288]]},
        {"type": "roboflow_core/line_counter@v2", "name": "line_v2", "image": IMAGE,
         "detections": "$steps.byte_v3.tracked_detections", "line_segment": [[0, 288], [768, 288]]},
        {"type": "roboflow_core/mask_area_measurement@v1", "name": "mask_area", "predictions": P},
    ]
    return steps


def workflow_for(mask_output: str) -> dict:
    steps = [{"type": "fastpath/rfdetr_instance_segmentation@v1", "name": "seg", "images": IMAGE,
              "model_id": "$inputs.model_id", "preprocess": "reference", "postprocess": "reference",
              "mask_output": mask_output}] + consumers()
    for step in steps:
        if step.get("mask_output", "") is None:
            step["mask_output"] = mask_output
    return {
        "version": "1.0",
        "inputs": [{"type": "WorkflowImage", "name": "image"}, {"type": "WorkflowVideoMetadata", "name": "video"},
                   {"type": "WorkflowParameter", "name": "model_id"}],
        "steps": steps,
        "outputs": [{"type": "JsonField", "name": s["name"], "selector": f"$steps.{s['name']}.*"} for s in steps],
    }


def video(index: int):
    from inference.core.workflows.execution_engine.entities.base import VideoMetadata

    return VideoMetadata(video_identifier="clip", frame_number=index, frame_timestamp=index / 30.0, fps=30,
                         comes_from_video_file=True)


def image(frame: np.ndarray, index: int):
    """The frame with the same video metadata in every run (time-based blocks read it from the image)."""
    from inference.core.workflows.execution_engine.entities.base import ImageParentMetadata, WorkflowImageData

    return WorkflowImageData(parent_metadata=ImageParentMetadata(parent_id="clip"), numpy_image=frame,
                             video_metadata=video(index))


def with_dependencies(name: str, steps: List[dict]) -> set:
    by_name = {s["name"]: s for s in steps}
    needed, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in needed:
            continue
        needed.add(current)
        todo += [part.split(".")[1] for part in json.dumps(by_name[current]).split('"') if part.startswith("$steps.")]
    return needed


def plain(value: Any) -> Any:
    """Outputs as plain, picklable data (detections with dense masks, images as arrays)."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, sv.Detections):
        return {"__detections__": True, "xyxy": value.xyxy, "confidence": value.confidence,
                "class_id": value.class_id, "tracker_id": value.tracker_id,
                "mask": None if value.mask is None else np.asarray(value.mask),
                "mask_type": type(value.mask).__name__, "data": plain(dict(value.data))}
    if hasattr(value, "numpy_image"):
        return {"__image__": value.numpy_image.copy()}
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [plain(item) for item in value]
    return value


def densify_report(model_dir: str, frame: np.ndarray) -> Dict[str, dict]:
    """Per consumer, alone with the steps it reads from, on compact masks: its conversions to dense."""
    return {step["type"]: run_variant("compact", model_dir, [frame], [step["name"]])["densified"]
            for step in consumers()}


def run_variant(mask_output: str, model_dir: str, frames: List[np.ndarray], steps: List[str] = ()) -> dict:
    """Run the matrix workflow (or only ``steps`` and what they need) on ``frames``; in a fresh process."""
    os.environ.setdefault("WORKFLOWS_PLUGINS", "inference_fastpath")
    from inference_fastpath.workflows.running import configure_environment

    configure_environment()
    counts: Counter = Counter()
    original_to_dense, original_array, original_getitem = CompactMask.to_dense, CompactMask.__array__, CompactMask.__getitem__
    counting = {"on": False}

    def to_dense(self):
        counts["full frames (to_dense)"] += counting["on"]
        return original_to_dense(self)

    def as_array(self, *args, **kwargs):
        counts["full frames (np.asarray)"] += counting["on"]
        return original_array(self, *args, **kwargs)

    def getitem(self, index):
        if isinstance(index, (int, np.integer)):
            counts["single masks (mask[i])"] += counting["on"]
        return original_getitem(self, index)

    CompactMask.to_dense, CompactMask.__array__, CompactMask.__getitem__ = to_dense, as_array, getitem
    try:
        return _run(mask_output, model_dir, frames, steps, counts, counting)
    finally:
        CompactMask.to_dense, CompactMask.__array__, CompactMask.__getitem__ = (
            original_to_dense, original_array, original_getitem)


def _run(mask_output, model_dir, frames, steps, counts, counting) -> dict:
    from inference_fastpath.workflows.running import execution_engine

    workflow = workflow_for(mask_output)
    if steps:
        needed = set().union(*(with_dependencies(name, workflow["steps"]) for name in steps))
        workflow["steps"] = [s for s in workflow["steps"] if s["name"] in needed]
        workflow["outputs"] = [o for o in workflow["outputs"] if o["name"] in steps]
    engine = execution_engine(workflow)
    results = []
    for index, frame in enumerate(frames):
        counting["on"] = True
        result = engine.run(runtime_parameters={"image": [image(frame, index)], "video": [video(index)],
                                                "model_id": model_dir})[0]
        counting["on"] = False
        results.append(plain(result))
    return {"results": results, "densified": {kind: n for kind, n in counts.items() if n}}
