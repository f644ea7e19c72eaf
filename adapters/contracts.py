"""The data that flows between stages: frame -> preprocess -> engine -> postprocess -> block output.

Every stage implementation (reference or fast) consumes and produces exactly these types, so a fast
stage can replace its reference twin without the neighbours noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
from inference_models.models.common.roboflow.model_packages import PreProcessingMetadata

Frame = Union[np.ndarray, torch.Tensor]  # uint8 HWC, BGR (numpy) or a CUDA uint8 tensor
MaskFormat = Literal["compact", "dense", "rle"]


@dataclass
class PreprocessedBatch:
    """Network input (N,3,H,W) plus what postprocess needs to map results back to each frame."""

    tensor: torch.Tensor
    metadata: List[PreProcessingMetadata]
    # Recorded on the stream that wrote `tensor`; consumers wait on it instead of a host sync.
    ready_event: Optional[torch.cuda.Event] = None


@dataclass
class RawOutputs:
    """Engine outputs for one batch, in inference-models' naming."""

    boxes: torch.Tensor  # (N, Q, 4) cxcywh, normalised to the network input
    logits: torch.Tensor  # (N, Q, C) class logits
    masks: torch.Tensor  # (N, Q, Hm, Wm) mask logits
    done_event: Optional[torch.cuda.Event] = None
    # Called once the postprocess has read the outputs, so a graph-owned buffer may be reused.
    release: Optional[Any] = None


@dataclass(frozen=True)
class PostprocessRequest:
    """What the user asked of the postprocess for one step run."""

    threshold: Union[float, torch.Tensor]  # scalar or per-class (indexed by class id)
    max_detections: Optional[int]
    mask_format: MaskFormat = "dense"


@dataclass
class FrameDetections:
    """Detections of one frame, host-side, ready to become an ``sv.Detections``.

    ``compact`` fills ``compact_masks``, ``dense`` fills ``dense_masks``, ``rle`` fills ``rle_masks``
    and ``compact_masks`` (the same masks, for blocks that read ``sv.Detections.mask``).
    """

    xyxy: np.ndarray  # (N, 4) float32 pixel coordinates in the original frame
    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int64
    image_size: Tuple[int, int]  # (height, width) of the original frame
    dense_masks: Optional[np.ndarray] = None  # (N, H, W) bool
    rle_masks: Optional[List[Dict[str, Any]]] = None  # COCO RLE {"size": [h, w], "counts": bytes}
    compact_masks: Optional[Any] = None  # supervision.CompactMask: per-mask crops of the foreground box

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])


@dataclass
class StageTimings:
    """Wall-clock milliseconds spent per stage for one step run (host view)."""

    preprocess_ms: float = 0.0
    engine_ms: float = 0.0
    postprocess_ms: float = 0.0
    output_ms: float = 0.0
    extra: Dict[str, float] = field(default_factory=dict)


InputBuffer = Callable[[int], torch.Tensor]  # batch size -> the engine's static input tensor


class PreprocessStage(Protocol):
    name: str

    def __call__(self, frames: Sequence[Frame], input_buffer: Optional[InputBuffer] = None) -> PreprocessedBatch:
        """``input_buffer``: where the engine wants its input; a stage may write there (no copy)."""


class EngineStage(Protocol):
    name: str

    def __call__(self, batch: PreprocessedBatch) -> RawOutputs: ...


class PostprocessStage(Protocol):
    name: str

    def __call__(
        self,
        raw: RawOutputs,
        metadata: List[PreProcessingMetadata],
        request: PostprocessRequest,
    ) -> List[FrameDetections]: ...


@dataclass(frozen=True)
class Verdict:
    """A fast stage's answer for one call: ``reason`` is None when it reproduces the reference for
    these inputs; ``prepared`` holds what the check computed that the run reuses."""

    reason: Optional[str] = None
    prepared: Any = None


class FastStage(Protocol):
    """What a fast twin adds to its reference twin's call signature (see ``adapters/fallback.py``)."""

    name: str

    def check(self, *args: Any, **kwargs: Any) -> Verdict: ...

    def run_checked(self, verdict: Verdict, *args: Any, **kwargs: Any) -> Any: ...


def _mask_keys(frame: FrameDetections) -> List[Any]:
    if frame.compact_masks is not None:
        cm = frame.compact_masks
        keys = [(r.tobytes(), tuple(s), tuple(o)) for r, s, o in zip(cm._rles, cm._crop_shapes.tolist(), cm._offsets.tolist())]
        if frame.rle_masks is not None:
            keys = [(k, bytes(r["counts"]), tuple(r["size"])) for k, r in zip(keys, frame.rle_masks)]
        return keys
    if frame.dense_masks is not None:
        return [m.tobytes() + bytes(str(m.shape), "ascii") for m in frame.dense_masks]
    if frame.rle_masks is not None:
        return [(bytes(r["counts"]), tuple(r["size"])) for r in frame.rle_masks]
    return [None] * len(frame)


def detections_difference(ours: FrameDetections, ref: FrameDetections, tie_tolerant: bool = False) -> Optional[str]:
    """None if ``ours`` equals ``ref`` (same detections, same order, exact boxes, equal
    masks); otherwise a description. ``tie_tolerant`` accepts any order among
    detections with exactly equal confidence (torch's CPU top-k/sort order them
    arbitrarily)."""
    if tuple(ours.image_size) != tuple(ref.image_size):
        return f"image_size {ours.image_size} != {ref.image_size}"
    if len(ours) != len(ref):
        return f"{len(ours)} detections != {len(ref)}"
    if ours.dense_masks is not None and ref.dense_masks is not None:
        if ours.dense_masks.shape != ref.dense_masks.shape:
            return f"dense shape {ours.dense_masks.shape} != {ref.dense_masks.shape}"
    rows_o = list(zip(ours.confidence.tolist(), ours.class_id.tolist(), map(tuple, ours.xyxy.tolist()), _mask_keys(ours)))
    rows_r = list(zip(ref.confidence.tolist(), ref.class_id.tolist(), map(tuple, ref.xyxy.tolist()), _mask_keys(ref)))
    if not np.array_equal(ours.confidence, ref.confidence):
        return "confidences differ"
    if rows_o == rows_r:
        return None
    if not tie_tolerant:
        bad = next(i for i, (a, b) in enumerate(zip(rows_o, rows_r)) if a != b)
        what = [n for n, x, y in zip(("confidence", "class", "box", "mask"), rows_o[bad], rows_r[bad]) if x != y]
        return f"detection {bad} differs in {what}"
    key = lambda r: (r[0], r[1], r[2], str(r[3]))
    if sorted(rows_o, key=key) != sorted(rows_r, key=key):
        return "detections differ beyond the order of exact score ties"
    return None
