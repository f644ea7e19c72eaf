"""Recorded engine outputs: boxes, logits, masks and their ``PreProcessingMetadata``, one ``.pt`` per case.

``tests/test_postprocess_fused_stage.py`` feeds every ``tests/data/postprocess/*.pt`` to both the
fused postprocess and inference-models' reference and requires identical results;
``examples/record_postprocess_cases.py`` writes those files.

A file is ``torch.save`` of a dict of CPU tensors and plain types (loadable with
``weights_only=True``). Masks are stored zlib-compressed, optionally *compacted*:

* ``mask_dtype=torch.float16`` stores the mask logits at half precision; they load back in
  their original dtype (float32 for RF-DETR). The loaded tensor is not the engine's exact
  output, but both implementations get the *same* float32 input, which is all an equality
  test between them needs.
* ``prune=True`` zeroes what no postprocess can read for the case's request
  (``info["threshold"]``, ``info.get("max_detections")``, ``info["num_classes"]``): the mask
  planes of queries that cannot be selected, and the mask-grid cells inside each frame's
  letterbox padding (the reference crops them off before resizing). Zeros compress to
  almost nothing. A pruned file is only valid for thresholds >= ``info["threshold"]``.

Logits and boxes are always stored exactly (they decide selection, order and boxes).
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from inference_models.entities import ImageDimensions
from inference_models.models.common.roboflow.model_packages import (
    PreProcessingMetadata,
    StaticCropOffset,
)

from inference_fastpath.adapters.contracts import RawOutputs

FORMAT_VERSION = 2  # 1: plain "masks" tensor (still readable)


def _metadata_to_dict(meta: PreProcessingMetadata) -> Dict[str, Any]:
    keys = ("pad_left", "pad_top", "pad_right", "pad_bottom", "scale_width", "scale_height")
    out: Dict[str, Any] = {k: getattr(meta, k) for k in keys}
    out["original_size"] = list(meta.original_size)
    out["size_after_pre_processing"] = list(meta.size_after_pre_processing)
    out["inference_size"] = list(meta.inference_size)
    out["static_crop_offset"] = list(meta.static_crop_offset)
    nis = meta.nonsquare_intermediate_size
    out["nonsquare_intermediate_size"] = None if nis is None else list(nis)
    return out


def _metadata_from_dict(data: Dict[str, Any]) -> PreProcessingMetadata:
    nis = data.get("nonsquare_intermediate_size")
    return PreProcessingMetadata(
        pad_left=data["pad_left"],
        pad_top=data["pad_top"],
        pad_right=data["pad_right"],
        pad_bottom=data["pad_bottom"],
        original_size=ImageDimensions(*data["original_size"]),
        size_after_pre_processing=ImageDimensions(*data["size_after_pre_processing"]),
        inference_size=ImageDimensions(*data["inference_size"]),
        scale_width=data["scale_width"],
        scale_height=data["scale_height"],
        static_crop_offset=StaticCropOffset(*data["static_crop_offset"]),
        nonsquare_intermediate_size=None if nis is None else ImageDimensions(*nis),
    )


def selectable_queries(
    logits: torch.Tensor,
    threshold: Union[float, torch.Tensor],
    num_classes: int,
    max_detections: Optional[int] = None,
) -> torch.Tensor:
    """(N, Q) bool: a superset of the queries the reference can turn into detections.

    A query is kept when one of its named classes (id < ``num_classes``; without class
    remapping the reference drops the others) scores >= ``threshold`` (the reference needs
    ``>``) and, under a cap, >= the ``max_detections``-th best such score. The flat top-Q
    preselection is ignored (it can only remove candidates).
    """
    scores = torch.sigmoid(logits.float())[..., :num_classes]
    thr = float(threshold.min()) if isinstance(threshold, torch.Tensor) else float(threshold)
    candidate = scores >= thr
    if max_detections is not None:
        for n in range(scores.shape[0]):
            ranked = scores[n][candidate[n]].sort(descending=True).values
            if ranked.numel() > max_detections:
                floor = ranked[max_detections - 1] if max_detections > 0 else float("inf")
                candidate[n] &= scores[n] >= floor
    return candidate.any(-1)


def padding_cells(meta: PreProcessingMetadata, mask_h: int, mask_w: int) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) mask-grid cells the reference crops off (its rounding)."""
    denorm = meta.nonsquare_intermediate_size or meta.inference_size
    hs, ws = mask_h / denorm.height, mask_w / denorm.width
    return round(hs * meta.pad_top), round(hs * meta.pad_bottom), round(ws * meta.pad_left), round(ws * meta.pad_right)


def _prune_masks(masks: torch.Tensor, logits: torch.Tensor, metadata: Sequence[PreProcessingMetadata],
                 info: Dict[str, Any]) -> Tuple[torch.Tensor, int]:
    keep = selectable_queries(logits, info["threshold"], int(info["num_classes"]), info.get("max_detections"))
    masks = masks.clone()
    masks[~keep] = 0
    mh, mw = masks.shape[-2:]
    for n, meta in enumerate(metadata):
        top, bottom, left, right = padding_cells(meta, mh, mw)
        if min(top, bottom, left, right) < 0 or top + bottom >= mh or left + right >= mw:
            continue  # layouts the stage refuses anyway: keep everything
        masks[n, :, :top] = 0
        masks[n, :, mh - bottom:] = 0
        masks[n, :, :, :left] = 0
        masks[n, :, :, mw - right:] = 0
    return masks, int((~keep).sum())


def _pack(tensor: torch.Tensor) -> torch.Tensor:
    """zlib of the tensor's bytes, byte planes first (high bytes of floats compress well)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    planes = raw.reshape(-1, tensor.element_size()).T.copy()
    return torch.from_numpy(np.frombuffer(zlib.compress(planes.tobytes(), 9), dtype=np.uint8).copy())


def _unpack(blob: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    planes = np.frombuffer(zlib.decompress(blob.numpy().tobytes()), dtype=np.uint8).reshape(size, -1)
    return torch.from_numpy(planes.T.copy()).reshape(-1).view(dtype).reshape(tuple(shape))


def save_recorded_outputs(
    path: str,
    raw: RawOutputs,
    metadata: Sequence[PreProcessingMetadata],
    info: Optional[Dict[str, Any]] = None,
    *,
    mask_dtype: Optional[torch.dtype] = None,
    prune: bool = False,
) -> None:
    """Save engine outputs + their metadata to a ``.pt`` file (see the module docstring).

    Lossless by default. ``mask_dtype`` (e.g. ``torch.float16``) narrows the stored masks;
    ``prune`` zeroes what the request in ``info`` cannot read (needs ``info["threshold"]``
    and ``info["num_classes"]``). What was done is recorded in ``info["storage"]``.
    """
    info = dict(info or {})
    masks = raw.masks.detach().cpu()
    logits = raw.logits.detach().cpu()
    storage: Dict[str, Any] = {"mask_dtype": str(mask_dtype or masks.dtype).replace("torch.", "")}
    if prune:
        masks, storage["pruned_queries"] = _prune_masks(masks, logits, metadata, info)
    info["storage"] = storage
    stored = masks.to(mask_dtype) if mask_dtype is not None else masks
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "boxes": raw.boxes.detach().cpu(),
            "logits": logits,
            "masks_zlib": _pack(stored),
            "masks_stored_dtype": str(stored.dtype).replace("torch.", ""),
            "masks_dtype": str(masks.dtype).replace("torch.", ""),
            "masks_shape": list(masks.shape),
            "metadata": [_metadata_to_dict(m) for m in metadata],
            "info": info,
        },
        path,
    )


def load_recorded_outputs(path: str, device: Union[str, torch.device] = "cpu"
                          ) -> Tuple[RawOutputs, List[PreProcessingMetadata], Dict[str, Any]]:
    """Inverse of :func:`save_recorded_outputs`: masks come back in their original dtype."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "masks_zlib" in data:
        masks = _unpack(data["masks_zlib"], getattr(torch, data["masks_stored_dtype"]), data["masks_shape"])
        masks = masks.to(getattr(torch, data["masks_dtype"]))
    else:
        masks = data["masks"]
    dev = torch.device(device)
    raw = RawOutputs(boxes=data["boxes"].to(dev), logits=data["logits"].to(dev), masks=masks.to(dev))
    return raw, [_metadata_from_dict(m) for m in data["metadata"]], dict(data.get("info", {}))
