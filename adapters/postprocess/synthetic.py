"""Synthetic RF-DETR engine outputs and the preprocessing metadata that goes with them.

For warm-ups, tests and benchmarks that need postprocess inputs of a given frame size and detection
count without running a network.

Example:
    >>> raw = synthetic_outputs(n_confident=3, seed=1)
    >>> tuple(raw.masks.shape), make_metadata((480, 640)).original_size.width
    ((1, 100, 78, 78), 640)
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from inference_models.entities import ImageDimensions
from inference_models.models.common.roboflow.model_packages import (
    PreProcessingMetadata,
    StaticCropOffset,
)

from inference_fastpath.adapters.contracts import RawOutputs


def make_metadata(
    original_hw: Tuple[int, int],
    inference_hw: Tuple[int, int] = (312, 312),
    mode: str = "stretch",
    static_crop: Optional[Tuple[int, int, int, int]] = None,
) -> PreProcessingMetadata:
    """``PreProcessingMetadata`` like inference-models' pre-processing produces.

    mode: "stretch" (resize to the network size) or "letterbox" (keep aspect, pad).
    static_crop: (x, y, width, height) crop applied before resizing.
    """
    oh, ow = original_hw
    ih, iw = inference_hw
    if static_crop is None:
        ox = oy = 0
        ch, cw = oh, ow
    else:
        ox, oy, cw, ch = static_crop
    pad = (0, 0, 0, 0)
    if mode == "stretch":
        sw, sh = iw / cw, ih / ch
    elif mode == "letterbox":
        s = min(iw / cw, ih / ch)
        nw, nh = round(cw * s), round(ch * s)
        left, top = (iw - nw) // 2, (ih - nh) // 2
        pad = (left, top, iw - nw - left, ih - nh - top)
        sw = sh = s
    else:
        raise ValueError(mode)
    return PreProcessingMetadata(
        pad_left=pad[0],
        pad_top=pad[1],
        pad_right=pad[2],
        pad_bottom=pad[3],
        original_size=ImageDimensions(height=oh, width=ow),
        size_after_pre_processing=ImageDimensions(height=ch, width=cw),
        inference_size=ImageDimensions(height=ih, width=iw),
        scale_width=sw,
        scale_height=sh,
        static_crop_offset=StaticCropOffset(offset_x=ox, offset_y=oy, crop_width=cw, crop_height=ch),
    )


def synthetic_outputs(
    batch: int = 1,
    queries: int = 100,
    classes: int = 91,
    mask_hw: Tuple[int, int] = (78, 78),
    n_confident: int = 10,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> RawOutputs:
    """RF-DETR-seg-like outputs: most queries are background (sigmoid << 0.5),
    ``n_confident`` queries score one class well above, masks are smooth blobs
    roughly inside their boxes."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, queries, classes), generator=gen) * 1.5 - 6.0
    for b in range(batch):
        idx = torch.randperm(queries, generator=gen)[:n_confident]
        cls = torch.randint(0, max(classes - 1, 1), (n_confident,), generator=gen)
        logits[b, idx, cls] = torch.rand(n_confident, generator=gen) * 6.0 + 0.5
    cxcy = torch.rand((batch, queries, 2), generator=gen) * 0.8 + 0.1
    wh = torch.rand((batch, queries, 2), generator=gen) * 0.4 + 0.05
    boxes = torch.cat([cxcy, wh], dim=-1)
    mh, mw = mask_hw
    yy = (torch.arange(mh, dtype=torch.float32) + 0.5)[:, None] / mh
    xx = (torch.arange(mw, dtype=torch.float32) + 0.5)[None, :] / mw
    dy = (yy[None, None] - cxcy[..., 1, None, None]) / (wh[..., 1, None, None] / 2)
    dx = (xx[None, None] - cxcy[..., 0, None, None]) / (wh[..., 0, None, None] / 2)
    blob = 1.0 - (dx**2 + dy**2)
    noise = torch.nn.functional.avg_pool2d(
        torch.randn((batch * queries, 1, mh, mw), generator=gen), 5, 1, 2
    ).view(batch, queries, mh, mw)
    masks = blob * 8.0 + noise * 6.0
    dev = torch.device(device)
    return RawOutputs(boxes=boxes.to(dev), logits=logits.to(dev), masks=masks.to(dev))
