"""The class-head calibration of the random demo model (``demo_model.py``): directions in decoder-feature
space that fire a stable number of queries per frame, a small head-only fit, the mask bias, and the
statistics the calibration aims at. Nothing here trains the network: it only shapes a realistic
workload (count of detections, classes, mask sizes) out of random weights.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> basis = frame_invariant_basis(torch.randn(4, 30, 8), count=3)
    >>> tuple(basis.shape)
    (3, 8)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, List, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

# Calibration knobs.
CALIBRATION_FRAMES = 16  # sampled evenly over the clip
CONFIDENCE = 0.4  # inference-models' default RF-DETR confidence
TARGET_MEAN_DETECTIONS = 13.0  # mean detections/frame aimed for on the calibration frames
LOGIT_SCALE = 4.0  # logit units per std of a class projection: sets how spread confidences are
FIT_STEPS = 400
SOFT_COUNT_TEMPERATURE = 0.5
MASK_TARGET_FOREGROUND = 0.30  # mean fraction of the frame covered by a detection's mask
NO_OBJECT_LOGIT = -10.0  # keeps the no-object column out of post-processing's top-k
BATCH_SIZE = 4

@dataclass
class CalibrationStats:
    """Detection statistics of the reference pipeline on the calibration frames."""

    frames: List[int]
    detections_per_frame: List[int]
    mean_detections: float
    min_detections: int
    max_detections: int
    distinct_classes: int
    mean_classes_per_frame: float
    confidence_min: float
    confidence_max: float
    mean_mask_foreground: float
    empty_masks: int
    queries_with_two_classes: int


@contextlib.contextmanager
def capture_class_embed_input(network: "torch.nn.Module") -> Iterator[List["torch.Tensor"]]:
    """Collect the last decoder layer's hidden states (input of ``class_embed``)."""
    captured: List["torch.Tensor"] = []

    def hook(_module: Any, inputs: Tuple[Any, ...], _output: Any) -> None:
        # hs is (decoder_layers, batch, queries, dim); post-processing only reads the last layer.
        captured.append(inputs[0][-1].detach().clone())

    handle = network.class_embed.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# class-head calibration
# --------------------------------------------------------------------------------------------


def frame_invariant_basis(features: "torch.Tensor", count: int) -> "torch.Tensor":
    """Directions with large within-frame variance relative to between-frame variance.

    Solves S_within v = w (S_between + ridge) v. Thresholding a projection on such a direction
    picks a similar number of queries in every frame, whatever the scene.
    """
    import torch

    x = features.double()  # (frames, queries, dim)
    dim = x.shape[-1]
    frame_means = x.mean(dim=1)
    between = torch.cov(frame_means.T, correction=0)
    centred = (x - frame_means[:, None]).reshape(-1, dim)
    within = centred.T @ centred / centred.shape[0]
    # A ridge keeps this well-posed: only a handful of frame means are observed.
    ridge = 0.03 * torch.trace(within) / dim
    denominator = between + ridge * torch.eye(dim, dtype=x.dtype)
    inv_chol = torch.linalg.inv(torch.linalg.cholesky(denominator))
    _, vectors = torch.linalg.eigh(inv_chol @ within @ inv_chol.T)
    basis = (inv_chol.T @ vectors).flip(1)[:, :count].T
    return (basis / basis.norm(dim=1, keepdim=True)).float()


def fit_class_head(
    features: "torch.Tensor", seed: int, target: float, num_classes: int
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Return (weight [C, D], bias [C]) for the ``num_classes`` real classes of ``class_embed``."""
    import torch

    frames, queries, dim = features.shape
    threshold = math.log(CONFIDENCE / (1.0 - CONFIDENCE))
    basis = frame_invariant_basis(features, num_classes)  # (C, D)
    generator = torch.Generator().manual_seed(seed + 2)
    mixing_init = torch.eye(num_classes) + 0.1 * torch.randn(
        num_classes, num_classes, generator=generator
    )
    flat = features.reshape(-1, dim)

    def directions(mixing: "torch.Tensor") -> "torch.Tensor":
        vectors = mixing @ basis
        return vectors / vectors.norm(dim=1, keepdim=True)

    with torch.no_grad():
        projected = flat @ directions(mixing_init).T
        z_init = (projected - projected.mean(0)) / projected.std(0)
        # Start each class at the rate that gives `target` detections per frame overall.
        quantile = torch.quantile(z_init, 1.0 - target / (num_classes * queries), dim=0)
    mixing = mixing_init.clone().requires_grad_(True)
    offsets = (-quantile).clone().requires_grad_(True)  # in units of projection std
    optimiser = torch.optim.Adam([mixing, offsets], lr=0.03)
    log_target = math.log(target)
    # Autograd is used only for this (C x C + C)-parameter head fit on cached features.
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            projected = features @ directions(mixing).T  # (F, Q, C)
            z = (projected - projected.mean((0, 1)).detach()) / projected.std((0, 1)).detach()
            # Soft "passes the confidence threshold" indicator.
            soft = torch.sigmoid(LOGIT_SCALE * (z + offsets) / SOFT_COUNT_TEMPERATURE)
            per_frame = soft.sum((1, 2))
            loss_count = (torch.log(per_frame + 0.5) - log_target).pow(2).mean()
            loss_floor = torch.relu(math.log(target / 2) - torch.log(per_frame + 0.5)).pow(2).mean()
            per_query = soft.sum(2)
            # Sum over class pairs of the same query: penalises one query firing twice.
            loss_pairs = ((per_query.pow(2) - soft.pow(2).sum(2)) / 2).sum(1).mean() / target
            per_class = soft.sum(1).mean(0)
            loss_balance = (torch.log(per_class + 0.2) - math.log(target / num_classes)).pow(2).mean()
            loss = loss_count + loss_floor + loss_pairs + loss_balance
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        vectors = directions(mixing)
        projected = features @ vectors.T
        mean, std = projected.mean((0, 1)), projected.std((0, 1))
        weight = LOGIT_SCALE * vectors / std[:, None]
        bias = LOGIT_SCALE * (offsets - mean / std) + threshold
        # Shared shift so the *hard* count (strict score > confidence) hits the target mean.
        logits = features @ weight.T + bias
        low, high = -20.0, 20.0
        for _ in range(60):
            middle = (low + high) / 2
            mean_count = ((logits + middle) > threshold).sum((1, 2)).double().mean().item()
            if mean_count > target:
                high = middle
            else:
                low = middle
        bias = bias + (low + high) / 2
    return weight, bias


def mask_bias_shift(mask_logits: "torch.Tensor", target_fraction: float) -> float:
    """Additive shift of the mask logits giving ``target_fraction`` mean foreground."""
    low, high = -50.0, 50.0
    for _ in range(50):
        middle = (low + high) / 2
        if ((mask_logits + middle) > 0).float().mean().item() > target_fraction:
            high = middle
        else:
            low = middle
    return (low + high) / 2


# --------------------------------------------------------------------------------------------
# reference-pipeline statistics
# --------------------------------------------------------------------------------------------


def detection_stats(
    detections: Sequence[Any], frame_indices: Sequence[int]
) -> CalibrationStats:
    """Summarise inference-models ``InstanceDetections`` (one per frame)."""
    counts = [int(d.class_id.shape[0]) for d in detections]
    classes = [set(d.class_id.tolist()) for d in detections]
    confidences = [c for d in detections for c in d.confidence.tolist()]
    fractions: List[float] = []
    empty = 0
    for det in detections:
        if det.mask.shape[0] == 0:
            continue
        per_mask = det.mask.reshape(det.mask.shape[0], -1).float().mean(1)
        fractions.extend(per_mask.tolist())
        empty += int((per_mask == 0).sum().item())
    duplicates = 0
    for det in detections:
        # Same box (same query) reported with two classes.
        boxes = [tuple(round(v, 3) for v in box) for box in det.xyxy.tolist()]
        duplicates += len(boxes) - len(set(boxes))
    return CalibrationStats(
        frames=[int(i) for i in frame_indices],
        detections_per_frame=counts,
        mean_detections=float(np.mean(counts)) if counts else 0.0,
        min_detections=min(counts) if counts else 0,
        max_detections=max(counts) if counts else 0,
        distinct_classes=len(set().union(*classes)) if classes else 0,
        mean_classes_per_frame=float(np.mean([len(c) for c in classes])) if classes else 0.0,
        confidence_min=float(min(confidences)) if confidences else 0.0,
        confidence_max=float(max(confidences)) if confidences else 0.0,
        mean_mask_foreground=float(np.mean(fractions)) if fractions else 0.0,
        empty_masks=empty,
        queries_with_two_classes=duplicates,
    )
