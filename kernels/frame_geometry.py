"""How one frame's network outputs map onto its final mask canvas: the geometry the fused postprocess
(``postprocess_select.py``, ``mask_resize.py``) decodes boxes and resizes masks with, built on the host
from inference-models' pre-processing metadata.

Example:
    >>> g = FrameGeometry(denorm_h=312, denorm_w=312, pad_left=0, pad_top=0, scale_w=0.5, scale_h=0.5,
    ...                   crop_top=0, crop_left=0, crop_h=78, crop_w=78, target_h=624, target_w=624,
    ...                   canvas_h=624, canvas_w=624, offset_y=0, offset_x=0, image_h=624, image_w=624)
    >>> g.round_boxes, geometry_params([g]).shape
    (True, (1, 12))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

PARAM_WORDS = 12  # float32 words per frame of the box decode's parameters


@dataclass(frozen=True)
class FrameGeometry:
    """How network outputs of one frame map onto its final mask canvas.

    Mirrors the arithmetic of inference-models' ``align_instance_segmentation_results``
    with ``masks_resolution_factor=1.0``.
    """

    denorm_h: int  # network size the normalised boxes refer to
    denorm_w: int
    pad_left: int
    pad_top: int
    scale_w: float
    scale_h: float
    crop_top: int  # rows/cols of the mask grid left after removing the padding band
    crop_left: int
    crop_h: int
    crop_w: int
    target_h: int  # size the cropped grid is resized to (= size after pre-processing)
    target_w: int
    canvas_h: int  # final mask size
    canvas_w: int
    offset_y: int  # where the resized grid sits on the canvas (static crop)
    offset_x: int
    image_h: int
    image_w: int

    @property
    def round_boxes(self) -> bool:
        # finalize_instance_segmentation_boxes rounds only when mask grid == image grid
        return (self.canvas_h, self.canvas_w) == (self.image_h, self.image_w)

    @property
    def mask_size(self) -> Tuple[int, int]:
        return self.canvas_h, self.canvas_w


def frame_geometry(metadata, mask_h: int, mask_w: int) -> FrameGeometry:
    """Build the geometry of one frame from its ``PreProcessingMetadata``.

    Raises ``ValueError`` for layouts the reference itself cannot handle the usual way
    (negative padding, a padding band covering the whole mask grid).
    """
    denorm = metadata.nonsquare_intermediate_size or metadata.inference_size
    h_scale = mask_h / denorm.height
    w_scale = mask_w / denorm.width
    # Python round() == the reference's round(): half to even on doubles
    pt, pb = round(h_scale * metadata.pad_top), round(h_scale * metadata.pad_bottom)
    pl, pr = round(w_scale * metadata.pad_left), round(w_scale * metadata.pad_right)
    if min(pt, pb, pl, pr) < 0:
        raise ValueError("negative letterbox padding is not supported")
    crop_h, crop_w = mask_h - pt - pb, mask_w - pl - pr
    if crop_h < 1 or crop_w < 1:
        raise ValueError("letterbox padding covers the whole mask grid")
    sap = metadata.size_after_pre_processing
    orig = metadata.original_size
    crop = metadata.static_crop_offset
    target_h, target_w = int(sap.height), int(sap.width)
    canvas_h, canvas_w, off_y, off_x = target_h, target_w, 0, 0
    if crop.offset_x > 0 or crop.offset_y > 0 or tuple(sap) != tuple(orig):
        ch_scale = target_h / sap.height
        cw_scale = target_w / sap.width
        off_y = round(crop.offset_y * ch_scale)
        off_x = round(crop.offset_x * cw_scale)
        canvas_h = max(1, round(orig.height * ch_scale), off_y + target_h)
        canvas_w = max(1, round(orig.width * cw_scale), off_x + target_w)
    return FrameGeometry(
        denorm_h=int(denorm.height),
        denorm_w=int(denorm.width),
        pad_left=int(metadata.pad_left),
        pad_top=int(metadata.pad_top),
        scale_w=float(metadata.scale_width),
        scale_h=float(metadata.scale_height),
        crop_top=pt,
        crop_left=pl,
        crop_h=crop_h,
        crop_w=crop_w,
        target_h=target_h,
        target_w=target_w,
        canvas_h=int(canvas_h),
        canvas_w=int(canvas_w),
        offset_y=int(off_y),
        offset_x=int(off_x),
        image_h=int(orig.height),
        image_w=int(orig.width),
    )


def geometry_params(geometries: Sequence[FrameGeometry]) -> np.ndarray:
    """Per-image float32 parameters of the box decode (values the reference casts to f32)."""
    rows = []
    for g in geometries:
        rows.append(
            [
                g.denorm_w,
                g.denorm_h,
                g.pad_left,
                g.pad_top,
                g.scale_w,
                g.scale_h,
                g.offset_x,
                g.offset_y,
                g.canvas_w,
                g.canvas_h,
                1.0 if g.round_boxes else 0.0,
                0.0,
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(-1, PARAM_WORDS)


__all__ = ["PARAM_WORDS", "FrameGeometry", "frame_geometry", "geometry_params"]
