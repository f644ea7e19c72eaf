"""Which twin paints the masks: the block's ``painter`` option resolved once per step.

``crops`` paints on the host, only inside each mask's crop rectangle; ``triton`` uploads the region
the masks span together, paints it on the GPU and downloads it; ``reference`` is the stock annotator.
``auto`` sends each frame to whichever of the two fast twins its masks favour: crop painting costs in
proportion to the crops' summed area, the GPU round trip in proportion to the covered region, so
small objects stay on the host and frame-filling masks go to the GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import supervision as sv
import torch

from inference_fastpath.adapters.contracts import Verdict
from inference_fastpath.adapters.device_placement import resolve_device
from inference_fastpath.adapters.fallback import FallbackStage
from inference_fastpath.adapters.visualization.crop_painting import CropMaskPainter, covered_fraction
from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter
from inference_fastpath.adapters.visualization.painting_contract import FastPainter
from inference_fastpath.adapters.visualization.reference import AnnotatorPainter
from inference_fastpath.kernels.triton_runtime import unavailable_reason

PAINTERS = ("auto", "crops", "triton", "reference")
# Above this summed crop area (in frames), `auto` paints on the GPU: host crop painting grows with the
# crops' area, the GPU's cost is mostly the covered region's two transfers, which a few frame-sized
# masks already pay for (examples/benchmarks/bench_mask_painting.py measures both).
GPU_FROM_COVERAGE = 0.5


class CoverageRoutedPainter(FastPainter):
    """``auto`` on a CUDA machine: crop painting for small masks, the GPU kernel for large ones.

    Example:
        >>> painter = CoverageRoutedPainter(CropMaskPainter(), GpuMaskPainter(torch.device("cuda")))  # doctest: +SKIP
        >>> frame = painter(frame, detections, sv.MaskAnnotator())  # doctest: +SKIP
    """

    name = "auto"

    def __init__(self, crops: CropMaskPainter, gpu: GpuMaskPainter) -> None:
        self.crops = crops
        self.gpu = gpu

    def check(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
              copy: bool = False) -> Verdict:
        return self.crops.check(scene, detections, annotator, copy)

    def run_checked(self, verdict: Verdict, scene: np.ndarray, detections: sv.Detections,
                    annotator: sv.MaskAnnotator, copy: bool = False) -> np.ndarray:
        masks = detections.mask
        if masks is not None and len(detections) and covered_fraction(masks, scene.shape[:2]) > GPU_FROM_COVERAGE:
            gpu_verdict = self.gpu.check(scene, detections, annotator, copy)
            if gpu_verdict.reason is None:
                return self.gpu.run_checked(gpu_verdict, scene, detections, annotator, copy)
        return self.crops.run_checked(verdict, scene, detections, annotator, copy)


def resolve_painter(requested: str, device: Optional[torch.device] = None) -> Tuple[object, Optional[str]]:
    """The painter for option value ``requested`` and, when it is not what was asked for, why.

    Every fast painter is wrapped in a :class:`FallbackStage` whose reference is the stock annotator,
    so dense masks and odd frames are still painted, with the reason logged once.

    Example:
        >>> painter, reason = resolve_painter("crops", torch.device("cpu"))
        >>> painter.name, reason
        ('crops', None)
    """
    if requested not in PAINTERS:
        raise ValueError(f"painter={requested!r} is not one of {PAINTERS}")
    device = resolve_device("auto") if device is None else torch.device(device)
    reference = AnnotatorPainter()
    if requested == "reference":
        return reference, None
    if requested == "crops":
        return FallbackStage("mask painting", CropMaskPainter(), reference), None
    # triton runs on CUDA, or on the CPU under the Triton interpreter (the tests); auto uses it on CUDA only
    reason = unavailable_reason(device)
    if requested == "auto":
        if device.type != "cuda" or reason is not None:
            return FallbackStage("mask painting", CropMaskPainter(), reference), None
        routed = CoverageRoutedPainter(CropMaskPainter(), GpuMaskPainter(device))
        return FallbackStage("mask painting", routed, reference), None
    if reason is not None:
        return reference, reason
    return FallbackStage("mask painting", GpuMaskPainter(device), reference), None
