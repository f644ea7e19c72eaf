"""Reference postprocess: inference-models' RF-DETR segmentation post-processing functions.

Dense and RLE outputs come straight from inference-models; compact masks are built from them by
supervision's own encoder (``compact.compact_from_dense``).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from inference_models.models.common.roboflow.model_packages import PreProcessingMetadata
from inference_models.models.rfdetr.common import (
    post_process_instance_segmentation_results,
    post_process_instance_segmentation_results_to_rle_masks,
)

from inference_fastpath.adapters.postprocess.compact import compact_from_dense
from inference_fastpath.adapters.contracts import (
    FrameDetections,
    PostprocessRequest,
    RawOutputs,
)


class ReferencePostprocess:
    name = "reference"

    def __init__(self, num_classes: int, classes_re_mapping=None) -> None:
        self._num_classes = num_classes
        self._classes_re_mapping = classes_re_mapping

    def __call__(
        self,
        raw: RawOutputs,
        metadata: List[PreProcessingMetadata],
        request: PostprocessRequest,
    ) -> List[FrameDetections]:
        if raw.done_event is not None:  # engines run on their own stream: order our reads after them
            torch.cuda.current_stream(raw.boxes.device).wait_event(raw.done_event)
        arguments = dict(
            bboxes=raw.boxes,
            logits=raw.logits,
            masks=raw.masks,
            pre_processing_meta=metadata,
            threshold=request.threshold,
            num_classes=self._num_classes,
            classes_re_mapping=self._classes_re_mapping,
            max_detections=request.max_detections,
        )
        if request.mask_format == "rle":
            results = post_process_instance_segmentation_results_to_rle_masks(**arguments)
        else:
            results = post_process_instance_segmentation_results(**arguments)
        if raw.release is not None:
            raw.release()
        return [self._to_frame_detections(result, meta, request) for result, meta in zip(results, metadata)]

    @staticmethod
    def _to_frame_detections(result, meta: PreProcessingMetadata, request: PostprocessRequest) -> FrameDetections:
        image_size = (int(meta.original_size.height), int(meta.original_size.width))
        detections = FrameDetections(
            xyxy=result.xyxy.detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
            confidence=result.confidence.detach().float().cpu().numpy(),
            class_id=result.class_id.detach().cpu().numpy().astype(np.int64),
            image_size=image_size,
        )
        if request.mask_format == "rle":
            detections.rle_masks = list(result.mask.to_coco_rle_masks())
            detections.compact_masks = compact_from_dense(_decode_rles(detections.rle_masks, image_size))
            return detections
        dense = result.mask.detach().cpu().numpy().astype(bool)
        if request.mask_format == "compact":
            detections.compact_masks = compact_from_dense(dense)
        else:
            detections.dense_masks = dense
        return detections


def _decode_rles(rles, image_size) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, *image_size), dtype=bool)
    return np.stack([mask_utils.decode(rle).astype(bool) for rle in rles])
