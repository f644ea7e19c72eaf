"""The data that flows between stages: frame -> preprocess -> engine -> postprocess -> block output.

Every stage implementation (reference or fast) consumes and produces exactly these types, so a fast
stage can replace its reference twin without the neighbours noticing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
from inference_models.models.common.roboflow.model_packages import PreProcessingMetadata

Frame = Union[np.ndarray, torch.Tensor]  # uint8 HWC, BGR (numpy) or a CUDA uint8 tensor
MaskFormat = Literal["dense", "rle", "polygon"]


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

    Exactly one of ``dense_masks`` / ``rle_masks`` / ``polygons`` is filled, as requested.
    """

    xyxy: np.ndarray  # (N, 4) float32 pixel coordinates in the original frame
    confidence: np.ndarray  # (N,) float32
    class_id: np.ndarray  # (N,) int64
    image_size: Tuple[int, int]  # (height, width) of the original frame
    dense_masks: Optional[np.ndarray] = None  # (N, H, W) bool
    rle_masks: Optional[List[Dict[str, Any]]] = None  # COCO RLE {"size": [h, w], "counts": bytes}
    polygons: Optional[List[np.ndarray]] = None  # (K, 2) float32 each

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


class PreprocessStage(Protocol):
    name: str

    def __call__(self, frames: Sequence[Frame]) -> PreprocessedBatch: ...


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
