"""`fastpath/mask_visualization@v1`: the stock mask visualization, painted fast from compact masks.

Inputs are those of `roboflow_core/mask_visualization@v1` (palette, colour axis, opacity, copy_image) plus
the `painter` and `device` options; the output image equals the stock block's within one intensity level.
"""

from __future__ import annotations

import logging
from typing import List, Literal, Optional, Type

from pydantic import ConfigDict, Field, field_validator

from inference.core.workflows.core_steps.visualizations.mask.v1 import MaskManifest, MaskVisualizationBlockV1
from inference.core.workflows.execution_engine.entities.base import WorkflowImageData
from inference.core.workflows.prototypes.block import BlockResult, WorkflowBlockManifest

from inference_fastpath.adapters.block_output import source_frame_mismatch
from inference_fastpath.adapters.device_placement import check_device_value, resolve_device
from inference_fastpath.adapters.visualization.painter_choice import resolve_painter

LOGGER = logging.getLogger("inference_fastpath")
BLOCK_TYPE = "fastpath/mask_visualization@v1"
OUTPUT_IMAGE_KEY = "image"


class BlockManifest(MaskManifest):
    model_config = ConfigDict(
        json_schema_extra={
            "name": "Mask Visualization (Fastpath)",
            "version": "v1",
            "short_description": "Mask visualization painted from compact masks, crop by crop or on the GPU.",
            "long_description": "The stock Mask Visualization block's picture, painted from the compact masks of the "
            "Fastpath segmentation block without a full-frame mask per object: small masks crop by crop on the "
            "host, frame-filling ones on the GPU with a Triton kernel. Dense masks are painted by the stock annotator.",
            "license": "Apache-2.0",
            "block_type": "visualization",
            "search_keywords": ["annotator", "mask", "fastpath", "gpu"],
            "ui_manifest": {"section": "visualization", "icon": "far fa-mask", "blockPriority": 12,
                            "supervision": True},
        }
    )
    type: Literal["fastpath/mask_visualization@v1"]
    painter: Literal["auto", "crops", "triton", "reference"] = Field(
        default="auto",
        description="Who paints the masks.",
        json_schema_extra={
            "values_metadata": {
                "auto": {"name": "Auto", "description": "Per frame: small masks crop by crop on the host, "
                         "frame-filling ones on the GPU (crop by crop without a CUDA device)."},
                "crops": {"name": "Crops (host)", "description": "Each mask's own crop rectangle, on the host."},
                "triton": {"name": "Triton (GPU)", "description": "The GPU kernel over the region the masks "
                           "span (also under TRITON_INTERPRET=1 on the CPU)."},
                "reference": {"name": "Reference", "description": "supervision's MaskAnnotator, as the stock block."},
            },
            "additional_section": True,
        },
    )
    device: str = Field(
        default="auto",
        description="GPU of the Triton painter: 'auto' (this process's current GPU), 'cuda:N', or 'cpu' (host "
        "painting only). Set it to the segmentation step's device when a pipeline runs on another GPU.",
        examples=["auto", "cuda:0", "cuda:1", "cpu"],
        json_schema_extra={"additional_section": True},
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device_format(cls, value):
        return check_device_value(value)


class FastpathMaskVisualizationBlockV1(MaskVisualizationBlockV1):
    """The stock block's palette and annotator settings, with the painting handed to a fast twin.

    Example:
        >>> block = FastpathMaskVisualizationBlockV1()  # doctest: +SKIP
        >>> block.run(image, predictions, True, "DEFAULT", 10, [], "CLASS", 0.5)["image"]  # doctest: +SKIP
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._painters = {}
        self._warned_frame_mismatch = False

    @classmethod
    def get_manifest(cls) -> Type[WorkflowBlockManifest]:
        return BlockManifest

    def run(self, image: WorkflowImageData, predictions, copy_image: bool, color_palette: Optional[str],
            palette_size: Optional[int], custom_colors: Optional[List[str]], color_axis: Optional[str],
            opacity: Optional[float], painter: str = "auto", device: str = "auto") -> BlockResult:
        self._warn_once_if_another_frame(image, predictions)
        annotator = self.getAnnotator(color_palette, palette_size, custom_colors, color_axis, opacity)
        if not copy_image:
            image.declare_numpy_image_mutated()
        # the painter makes the copy: the GPU painter receives its picture straight into a new frame
        annotated = self._painter(painter, device)(image.numpy_image, predictions, annotator, copy=bool(copy_image))
        return {OUTPUT_IMAGE_KEY: WorkflowImageData.copy_and_replace(origin_image_data=image, numpy_image=annotated)}

    def _warn_once_if_another_frame(self, image: WorkflowImageData, predictions) -> None:
        # painted anyway: a misconfigured workflow must not stop the stream, but it must not go unnoticed
        if self._warned_frame_mismatch:
            return
        problem = source_frame_mismatch(predictions, image)
        if problem:
            self._warned_frame_mismatch = True
            LOGGER.warning("step %s: %s", getattr(self, "_workflow_step_name", BLOCK_TYPE), problem)

    def _painter(self, requested: str, device: str):
        if (requested, device) not in self._painters:
            painter, reason = resolve_painter(requested, resolve_device(device))
            if reason:
                LOGGER.warning("step %s: painter=%s resolved to the stock annotator: %s",
                               getattr(self, "_workflow_step_name", BLOCK_TYPE), requested, reason)
            self._painters[(requested, device)] = painter
        return self._painters[(requested, device)]
