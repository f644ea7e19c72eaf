"""Last stage: host detections -> ``sv.Detections`` with the data keys stock Workflows blocks expect.

Compact and dense masks are attached as they come out of the postprocess (no polygon round trip),
minus the detections the stock v3 block's polygon step drops (masks whose largest contour has fewer
than 3 points). The RLE output keeps COCO RLE dicts in ``data["rle_mask"]`` with the same masks as a
``CompactMask`` in ``mask`` (so visualizations never decode the RLE to full frames), and keeps every
detection, as the stock v4 (RLE) block does.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import supervision as sv
from inference_fastpath.adapters.postprocess.compact import CompactMasks
from inference.core.workflows.core_steps.common.utils import (
    attach_parents_coordinates_to_sv_detections,
)
from inference.core.workflows.execution_engine.constants import (
    DETECTION_ID_KEY,
    IMAGE_DIMENSIONS_KEY,
    INFERENCE_ID_KEY,
    PARENT_ID_KEY,
    PREDICTION_TYPE_KEY,
    RLE_MASK_KEY_IN_SV_DETECTIONS,
)
from inference.core.workflows.execution_engine.entities.base import WorkflowImageData

from inference_fastpath.adapters.masks import survives_polygon_step
from inference_fastpath.adapters.contracts import FrameDetections

CLASS_NAME_KEY = "class_name"


def to_sv_detections(
    detections: FrameDetections,
    class_names: Union[Sequence[str], np.ndarray],
    image: WorkflowImageData,
    inference_id: Optional[str],
    class_filter: Optional[Sequence[str]] = None,
) -> sv.Detections:
    keep = _class_filter_mask(detections.class_id, class_names, class_filter)
    rle = detections.rle_masks is not None
    masks = detections.compact_masks if detections.compact_masks is not None else detections.dense_masks
    if masks is not None and not rle and len(keep):  # the stock v3 block's rule (v4, RLE, keeps all)
        keep &= survives_polygon_step(masks, detections.xyxy)
    count = int(keep.sum())
    keep_all = count == len(keep)  # the usual case: no copy of the masks
    height, width = detections.image_size
    if masks is not None and not keep_all:
        masks = masks[np.flatnonzero(keep)] if detections.compact_masks is not None else masks[keep]
    class_id = detections.class_id[keep].astype(int)
    prediction_type = "rle-instance-segmentation" if rle else "instance-segmentation"
    data = {  # given to the constructor: validated once, not once per key
        # a str array passes through asarray as is (the runner caches one: class_name_array)
        CLASS_NAME_KEY: np.asarray(class_names, dtype=str)[class_id].reshape(-1),
        DETECTION_ID_KEY: uuid4_strings(count),
        PARENT_ID_KEY: np.array([image.parent_metadata.parent_id] * count, dtype=str).reshape(-1),
        IMAGE_DIMENSIONS_KEY: np.array([[height, width]] * count, dtype=int).reshape(-1, 2),
    }
    if inference_id is not None:
        data[INFERENCE_ID_KEY] = np.array([inference_id] * count, dtype=str).reshape(-1)
    data[PREDICTION_TYPE_KEY] = np.array([prediction_type] * count, dtype=str).reshape(-1)
    if rle:
        rles = np.empty(count, dtype=object)  # 1-D object array of dicts, whatever their content
        rles[:] = detections.rle_masks if keep_all else [detections.rle_masks[i] for i in np.flatnonzero(keep)]
        data[RLE_MASK_KEY_IN_SV_DETECTIONS] = rles
    result = sv.Detections(
        xyxy=detections.xyxy[keep].astype(np.float64).reshape(-1, 4),
        confidence=detections.confidence[keep].astype(np.float64),
        class_id=class_id,
        mask=masks,
        data=data,
    )
    return attach_parents_coordinates_to_sv_detections(detections=result, image=image)


# sv.Detections.metadata key: the video frame number of the image the predictions were made on, set
# when the step delivers the previous frame (downstream_overlap), so a visualization can tell when it
# was handed the wrong image. Metadata is not serialised, so the step's output stays the stock one.
SOURCE_FRAME_KEY = "fastpath_source_frame_number"


def tag_source_frame(detections: Optional[sv.Detections], image: Optional[WorkflowImageData]) -> None:
    """Record ``image``'s video frame number on ``detections`` (a no-op for a missing value)."""
    if detections is not None and image is not None:
        detections.metadata[SOURCE_FRAME_KEY] = image.video_metadata.frame_number


def source_frame_mismatch(detections: sv.Detections, image: WorkflowImageData) -> Optional[str]:
    """Why ``detections`` do not belong to ``image`` (tagged by :func:`tag_source_frame`), or None when
    they do or carry no tag."""
    tagged = getattr(detections, "metadata", {}).get(SOURCE_FRAME_KEY)
    if tagged is None:
        return None
    frame = image.video_metadata.frame_number
    if tagged == frame:
        return None
    return (f"the predictions were made on video frame {tagged} but the image is frame {frame}: with "
            "downstream_overlap, take the image from the segmentation step's `image` output, not $inputs.image")


def uuid4_strings(count: int) -> np.ndarray:
    """``count`` random (version 4) UUID strings, as ``str(uuid.uuid4())`` gives, from one
    ``os.urandom`` call: the per-object ``uuid.UUID`` path costs more than the rest of the
    detection ids' bookkeeping."""
    raw = np.frombuffer(os.urandom(16 * count), dtype=np.uint8).reshape(count, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.tobytes().hex()
    return np.array(
        [f"{text[i:i + 8]}-{text[i + 8:i + 12]}-{text[i + 12:i + 16]}-{text[i + 16:i + 20]}-{text[i + 20:i + 32]}"
         for i in range(0, 32 * count, 32)],
        dtype=str,
    ).reshape(-1)


def empty_frame_detections(frame, mask_format: str = "dense") -> FrameDetections:
    """No detections for a frame that could not be processed (keeps its size when it has one)."""
    shape = getattr(frame, "shape", (0, 0))
    height, width = (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (0, 0)
    return FrameDetections(
        xyxy=np.zeros((0, 4), dtype=np.float32),
        confidence=np.zeros((0,), dtype=np.float32),
        class_id=np.zeros((0,), dtype=np.int64),
        image_size=(height, width),
        dense_masks=np.zeros((0, height, width), dtype=bool) if mask_format == "dense" else None,
        rle_masks=[] if mask_format == "rle" else None,
        compact_masks=None if mask_format == "dense" else CompactMasks([], np.zeros((0, 2), np.int32),
                                                                       np.zeros((0, 2), np.int32), (height, width)),
    )


def _class_filter_mask(
    class_id: np.ndarray, class_names: Sequence[str], class_filter: Optional[Sequence[str]]
) -> np.ndarray:
    if not class_filter:
        return np.ones(len(class_id), dtype=bool)
    accepted = set(class_filter)
    return np.array([class_names[int(c)] in accepted for c in class_id], dtype=bool).reshape(-1)
