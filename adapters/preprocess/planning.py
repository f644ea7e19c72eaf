"""Host-side planning of the Triton preprocess: the reference's resize arithmetic, frame by frame.

:func:`plan_frame` gives each frame its static crop, the optional dataset-version canvas step
(letterbox, center crop, fit longer edge) and the ``PreProcessingMetadata`` inference-models would
compute, with the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from inference_models.entities import ImageDimensions
from inference_models.models.auto_loaders.entities import PreProcessingOverrides
from inference_models.models.common.roboflow.model_packages import (
    ColorMode,
    ImagePreProcessing,
    NetworkInputDefinition,
    PreProcessingMetadata,
    ResizeMode,
    StaticCropOffset,
    TrainingInputSize,
)

from inference_fastpath.kernels.preprocess_resize_normalize import Box
from inference_fastpath.kernels.resize_coefficients import normalization_lut

class PlanningError(ValueError):
    """The frame cannot be preprocessed (the reference would fail on it too)."""


# --------------------------------------------------------------------------------------------
# Host-side planning (same arithmetic as the reference)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanvasStep:
    """Dataset-version step: ``cv2.resize`` of ``source`` (frame coordinates) into ``box`` of a
    ``width`` x ``height`` uint8 canvas filled with ``pad_value`` elsewhere."""

    width: int
    height: int
    source: Box
    box: Box
    pad_value: int


@dataclass(frozen=True)
class FramePlan:
    crop: Box  # region of the frame fed to the PIL stretch (static crop) when no canvas step
    canvas: Optional[CanvasStep]
    swap_rb: bool
    metadata: PreProcessingMetadata

    @property
    def launch_key(self) -> Tuple:
        """Frames with equal keys (and equal shapes) can share one kernel launch."""
        return (self.crop, self.canvas, self.swap_rb)


def _static_crop(
    height: int,
    width: int,
    image_pre_processing: ImagePreProcessing,
    overrides: Optional[PreProcessingOverrides],
) -> Tuple[Box, StaticCropOffset]:
    config = image_pre_processing.static_crop
    disabled = overrides is not None and overrides.disable_static_crop
    if not config or not config.enabled or disabled:
        return (0, 0, width, height), StaticCropOffset(
            offset_x=0, offset_y=0, crop_width=width, crop_height=height
        )
    x_min = int(config.x_min / 100 * width)
    y_min = int(config.y_min / 100 * height)
    x_max = int(config.x_max / 100 * width)
    y_max = int(config.y_max / 100 * height)
    # numpy slicing semantics (clamped, possibly empty), as image[y_min:y_max, x_min:x_max]
    xs = range(width)[x_min:x_max]
    ys = range(height)[y_min:y_max]
    if len(xs) == 0 or len(ys) == 0:
        raise PlanningError(f"static crop leaves an empty image from {width}x{height}")
    offset = StaticCropOffset(
        offset_x=x_min, offset_y=y_min, crop_width=len(xs), crop_height=len(ys)
    )
    return (xs.start, ys.start, len(xs), len(ys)), offset


def _letterbox_step(
    crop: Box, canvas_w: int, canvas_h: int, pad_value: int
) -> Tuple[CanvasStep, dict]:
    width, height = crop[2], crop[3]
    scale = min(canvas_w / width, canvas_h / height)
    new_w, new_h = int(width * scale), int(height * scale)
    if new_w < 1 or new_h < 1:
        raise PlanningError(f"letterbox of {width}x{height} into {canvas_w}x{canvas_h} is empty")
    pad_top = int((canvas_h - new_h) / 2)
    pad_left = int((canvas_w - new_w) / 2)
    step = CanvasStep(canvas_w, canvas_h, crop, (pad_left, pad_top, new_w, new_h), pad_value)
    meta = dict(
        pad_left=pad_left,
        pad_top=pad_top,
        pad_right=canvas_w - pad_left - new_w,
        pad_bottom=canvas_h - pad_top - new_h,
        inference_size=ImageDimensions(height=canvas_h, width=canvas_w),
        scale_width=scale,
        scale_height=scale,
    )
    return step, meta


def _center_crop_axis(image: int, canvas: int) -> Tuple[int, int, int, int, int]:
    """(canvas offset, image offset, copied length, reported pad before, reported pad after)."""
    canvas_pad = max(canvas - image, 0)
    canvas_before = canvas_pad // 2
    image_extra = max(image - canvas, 0)
    image_before = image_extra // 2
    if canvas > image:
        reported = (canvas_before, canvas_pad - canvas_before)
    else:
        reported = (-image_before, -(image_extra - image_before))
    return canvas_before, image_before, min(image, canvas), reported[0], reported[1]


def _center_crop_step(crop: Box, canvas_w: int, canvas_h: int) -> Tuple[CanvasStep, dict]:
    cx, ix, w, pad_left, pad_right = _center_crop_axis(crop[2], canvas_w)
    cy, iy, h, pad_top, pad_bottom = _center_crop_axis(crop[3], canvas_h)
    source = (crop[0] + ix, crop[1] + iy, w, h)
    step = CanvasStep(canvas_w, canvas_h, source, (cx, cy, w, h), 0)  # zero canvas, no resize
    meta = dict(
        pad_left=pad_left,
        pad_top=pad_top,
        pad_right=pad_right,
        pad_bottom=pad_bottom,
        inference_size=ImageDimensions(height=canvas_h, width=canvas_w),
        scale_width=1.0,
        scale_height=1.0,
    )
    return step, meta


def _fit_longer_edge_step(crop: Box, canvas_w: int, canvas_h: int) -> Tuple[CanvasStep, dict]:
    width, height = crop[2], crop[3]
    scale_x, scale_y = canvas_w / width, canvas_h / height
    if scale_x < scale_y:
        new_w, new_h = canvas_w, round(scale_x * height)
    else:
        new_w, new_h = round(scale_y * width), canvas_h
    if new_w < 1 or new_h < 1:
        raise PlanningError(f"fit-longer-edge of {width}x{height} is empty")
    step = CanvasStep(new_w, new_h, crop, (0, 0, new_w, new_h), 0)
    meta = dict(
        pad_left=0,
        pad_top=0,
        pad_right=0,
        pad_bottom=0,
        inference_size=ImageDimensions(height=new_h, width=new_w),
        scale_width=new_w / width,
        scale_height=new_h / height,
    )
    return step, meta


def needs_canvas_step(network_input: NetworkInputDefinition) -> bool:
    return (
        network_input.dataset_version_resize_dimensions is not None
        and network_input.resize_mode != ResizeMode.STRETCH_TO
    )


def plan_frame(
    height: int,
    width: int,
    network_input: NetworkInputDefinition,
    image_pre_processing: ImagePreProcessing,
    input_color_mode: Optional[ColorMode],
    overrides: Optional[PreProcessingOverrides] = None,
) -> FramePlan:
    """Geometry, colour swap and ``PreProcessingMetadata`` of one ``height`` x ``width`` frame,
    computed exactly as RF-DETR's ``pre_process_network_input`` (numpy path) does."""
    target = network_input.training_input_size
    if target is None:
        raise PlanningError("network_input has no training_input_size")
    target_size = ImageDimensions(width=target.width, height=target.height)
    original_size = ImageDimensions(width=width, height=height)
    crop, crop_offset = _static_crop(height, width, image_pre_processing, overrides)
    size_after = ImageDimensions(width=crop[2], height=crop[3])

    if not needs_canvas_step(network_input):
        # `None != color_mode` is True: the reference swaps when no input format is given.
        swap_rb = input_color_mode != network_input.color_mode
        metadata = PreProcessingMetadata(
            pad_left=0,
            pad_top=0,
            pad_right=0,
            pad_bottom=0,
            original_size=original_size,
            size_after_pre_processing=size_after,
            inference_size=target_size,
            scale_width=target_size.width / size_after.width,
            scale_height=target_size.height / size_after.height,
            static_crop_offset=crop_offset,
        )
        return FramePlan(crop, None, swap_rb, metadata)

    dims = network_input.dataset_version_resize_dimensions
    mode = network_input.resize_mode
    if mode in (ResizeMode.LETTERBOX, ResizeMode.LETTERBOX_REFLECT_EDGES):
        pad = network_input.padding_value or 0
        step, meta = _letterbox_step(crop, dims.width, dims.height, pad)
    elif mode == ResizeMode.CENTER_CROP:
        step, meta = _center_crop_step(crop, dims.width, dims.height)
    elif mode == ResizeMode.FIT_LONGER_EDGE:
        step, meta = _fit_longer_edge_step(crop, dims.width, dims.height)
    else:  # pragma: no cover - ResizeMode has no other member
        raise PlanningError(f"unsupported resize mode {mode}")
    # The dataset-version handler defaults a missing input format to BGR.
    swap_rb = (input_color_mode or ColorMode.BGR) != network_input.color_mode
    metadata = PreProcessingMetadata(
        original_size=original_size,
        size_after_pre_processing=size_after,
        static_crop_offset=crop_offset,
        nonsquare_intermediate_size=meta.pop("inference_size"),
        inference_size=target_size,
        **meta,
    )
    return FramePlan(crop, step, swap_rb, metadata)


def stretch_network_input(height: int, width: int) -> NetworkInputDefinition:
    """An RF-DETR-style network input: stretch to (height, width), RGB, /255, ImageNet mean/std
    (what the benchmarks and tests feed the stage when no model package is at hand)."""
    return NetworkInputDefinition(
        training_input_size=TrainingInputSize(height=height, width=width),
        dynamic_spatial_size_supported=False,
        color_mode=ColorMode.RGB,
        resize_mode=ResizeMode.STRETCH_TO,
        input_channels=3,
        scaling_factor=255,
        normalization=([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    )


def rfdetr_normalization_lut(
    network_input: NetworkInputDefinition, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """LUT of RF-DETR's ``TF.to_tensor`` (always ``/255``) followed by its normalisation: mean/std
    when given, otherwise ``* (255 / scaling_factor)`` for a scaling factor other than 255."""
    if network_input.normalization:
        mean, std = network_input.normalization
        return normalization_lut(mean, std, dtype=dtype)
    factor = network_input.scaling_factor
    if factor is not None and factor != 255:
        return normalization_lut(None, None, multiplier=255.0 / factor, dtype=dtype)
    return normalization_lut(None, None, dtype=dtype)
