"""Workflow blocks of inference-fastpath (one versioned file per block)."""

from typing import List, Type


def load_blocks() -> List[Type]:
    from inference_fastpath.blocks.mask_visualization_v1 import FastpathMaskVisualizationBlockV1
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import RFDetrInstanceSegmentationBlockV1

    return [RFDetrInstanceSegmentationBlockV1, FastpathMaskVisualizationBlockV1]
