"""DETR-style set criterion (Hungarian matching + losses) for RF-DETR-seg training.

The network's raw output dict (``pred_logits`` (B, Q, C+1), ``pred_boxes`` (B, Q, 4) normalised
cxcywh, ``pred_masks`` (B, Q, h, w) logits at 1/4 of the input, plus ``aux_outputs`` per earlier decoder layer and
``enc_outputs`` for the two-stage proposals) is compared with per-image targets:

* each output set is matched on its own; with group-DETR (train mode, ``num_groups`` query
  groups of Q / num_groups queries each) every group is matched separately, so one ground-truth
  object gets one positive per group;
* classification runs over *all* queries and all C+1 channels: by default RF-DETR's IoU-aware
  BCE (a matched query's target is ``p**alpha * IoU**(1 - alpha)`` of its box, so scores track
  localisation quality and good matches are pushed towards 1), or the sigmoid focal loss
  (``classification="focal"``), which with alpha 0.25 leaves positives' scores near 0.4-0.5 in
  a short training; the last channel (RF-DETR's "no-object" slot, dropped by post-processing
  when it wins the top-k) never gets a positive target, so it is pushed down like any absent class;
* matched queries get L1 + GIoU box losses and BCE + dice mask losses at the predicted mask
  resolution (ground-truth masks are area-averaged down to it, giving soft targets whose
  pixel grid lines up with the bilinear upsampling post-processing does).

Usage::

    criterion = SetCriterion(num_classes=11)          # C + 1 logit channels
    losses = criterion(network(images), targets)      # targets: [{"labels", "boxes", "masks"}]
    losses["loss"].backward()                         # other keys: unweighted terms, detached
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

Target = Mapping[str, torch.Tensor]  # labels (N,) int64, boxes (N, 4) cxcywh in [0, 1], masks (N, H, W)
Match = Tuple[torch.Tensor, torch.Tensor]  # (query indices, target indices), int64 on CPU
TERMS = ("cls", "bbox", "giou", "mask_bce", "mask_dice")


@dataclass(frozen=True)
class CriterionWeights:
    """Matching costs and loss weights (RF-DETR-like magnitudes: box L1 counts more than GIoU
    because it is in normalised units, masks weigh like boxes so they are learnt from the start)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_mask_bce: float = 2.0
    cost_mask_dice: float = 2.0
    cls: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    mask_bce: float = 2.0
    mask_dice: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    encoder: float = 1.0  # multiplier of the two-stage proposal losses
    classification: str = "ia_bce"  # or "focal"

    def __post_init__(self) -> None:
        if self.classification not in ("ia_bce", "focal"):
            raise ValueError(f"classification must be 'ia_bce' or 'focal', not {self.classification!r}")


# ---------------------------------------------------------------------------------------------
# box helpers


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU between every xyxy box of ``a`` (P, 4) and of ``b`` (N, 4) -> (P, N)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.max(a[:, None, :2], b[None, :, :2])
    high = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row i of ``a`` with row i of ``b`` (both (N, 4) xyxy) -> (N,)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-7)


def elementwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of row i of ``a`` with row i of ``b`` (both (N, 4) xyxy) -> (N,)."""
    if a.shape[0] == 0:
        return a.new_zeros(0)
    return torch.diagonal(pairwise_giou(a, b))


def downsample_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Area-average (N, H, W) masks to ``size``: soft targets, exact when H, W are multiples."""
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None], size=size, mode="area")[:, 0]


# ---------------------------------------------------------------------------------------------
# matching


def _focal_class_cost(prob: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    prob = prob[:, labels]
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    return positive - negative


def _mask_costs(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise mean BCE and dice cost between (P, hw) logits and (N, hw) soft targets."""
    pixels = logits.shape[1]
    # BCE(x, t) = softplus(x) - x * t, so the pairwise mean is a matmul.
    bce = (F.softplus(logits).sum(1, keepdim=True) - logits @ targets.T) / pixels
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(1)[:, None] + targets.sum(1)[None, :] + 1)
    return bce, dice


def concat_targets(targets: Sequence[Target], mask_size: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """All targets of a batch in one set of tensors (one launch per op instead of one per image);
    masks are area-downsampled to ``mask_size`` and flattened."""
    flat: Dict[str, Any] = {
        "sizes": [len(t["labels"]) for t in targets],
        "labels": torch.cat([t["labels"].long().reshape(-1) for t in targets]),
        "boxes": torch.cat([t["boxes"].float().reshape(-1, 4) for t in targets]),
    }
    if all("masks" in t for t in targets) and targets:
        masks = torch.cat([t["masks"] for t in targets])
        if masks.dim() == 3 and mask_size is not None:
            masks = downsample_masks(masks, mask_size)
        flat["masks"] = masks.float().flatten(1)
    return flat


@torch.no_grad()
def match_outputs(
    outputs: Mapping[str, torch.Tensor],
    targets: Union[Sequence[Target], Dict[str, Any]],
    weights: CriterionWeights = CriterionWeights(),
    num_groups: int = 1,
) -> List[Match]:
    """Hungarian matching per image and per query group.

    ``targets`` is a list of per-image targets (masks at the prediction resolution) or the
    result of :func:`concat_targets`. Returns one ``(query_idx, target_idx)`` pair of CPU int64
    tensors per image; query indices are global (group g owns queries ``[g*Q/G, (g+1)*Q/G)``),
    so with G groups each target appears G times.
    """
    flat = targets if isinstance(targets, dict) else concat_targets(targets)
    logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    batch, queries = logits.shape[:2]
    if queries % num_groups:
        raise ValueError(f"{queries} queries do not split into {num_groups} groups")
    sizes, per_group = flat["sizes"], queries // num_groups
    empty = torch.zeros(0, dtype=torch.int64)
    if sum(sizes) == 0:
        return [(empty, empty) for _ in sizes]
    # One cost matrix for the whole batch (queries of every image against every target): a few
    # large kernels and one device->host copy; the off-diagonal blocks are simply not used.
    cost = weights.cost_class * _focal_class_cost(
        logits.flatten(0, 1).sigmoid(), flat["labels"], weights.focal_alpha, weights.focal_gamma
    )
    cost = cost + weights.cost_bbox * torch.cdist(boxes.flatten(0, 1), flat["boxes"], p=1)
    cost = cost - weights.cost_giou * pairwise_giou(box_cxcywh_to_xyxy(boxes.flatten(0, 1)), box_cxcywh_to_xyxy(flat["boxes"]))
    if outputs.get("pred_masks") is not None and "masks" in flat:
        bce, dice = _mask_costs(outputs["pred_masks"].float().flatten(0, 1).flatten(1), flat["masks"])
        cost = cost + weights.cost_mask_bce * bce + weights.cost_mask_dice * dice
    cost = cost.view(batch, queries, -1).cpu().numpy()
    cost = np.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)  # scipy rejects non-finite costs
    matches: List[Match] = []
    offsets = np.cumsum([0] + list(sizes))
    for b, n in enumerate(sizes):
        block = cost[b, :, offsets[b] : offsets[b] + n]
        rows: List[np.ndarray] = []
        cols: List[np.ndarray] = []
        for g in range(num_groups if n else 0):
            r, c = linear_sum_assignment(block[g * per_group : (g + 1) * per_group])
            rows.append(r + g * per_group)
            cols.append(c)
        if not rows:
            matches.append((empty, empty))
            continue
        matches.append((torch.from_numpy(np.concatenate(rows)).long(), torch.from_numpy(np.concatenate(cols)).long()))
    return matches


# ---------------------------------------------------------------------------------------------
# losses


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal loss (Lin et al.) on logits; summed by the caller."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def iou_aware_bce(
    logits: torch.Tensor, positives: Tuple[torch.Tensor, ...], quality: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """RF-DETR's IoU-aware classification loss, element-wise (summed by the caller).

    ``positives`` indexes the matched (image, query, class) entries of ``logits`` and
    ``quality`` is each match's box IoU. A positive's soft target is ``t = p**alpha *
    IoU**(1 - alpha)`` (detached, at least 0.01); it is weighted ``t`` towards 1 and ``1 - t``
    towards 0. Every other entry is pushed to 0 with weight ``p**gamma`` (focal-style
    down-weighting of easy negatives).
    """
    prob = logits.detach().sigmoid()
    towards_one = torch.zeros_like(logits)
    towards_zero = prob.pow(gamma)
    if quality.numel():
        target = (prob[positives].pow(alpha) * quality.detach().clamp(min=0).pow(1 - alpha)).clamp(min=0.01)
        towards_one[positives] = target
        towards_zero[positives] = 1 - target
    return -towards_one * F.logsigmoid(logits) - towards_zero * F.logsigmoid(-logits)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss between (N, hw) logits and soft targets -> (N,)."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(1) + 1) / (prob.sum(1) + targets.sum(1) + 1)


class SetCriterion(torch.nn.Module):
    """Losses for every output set of RF-DETR-seg (final, aux layers, encoder proposals)."""

    def __init__(self, num_classes: int, weights: CriterionWeights = CriterionWeights()) -> None:
        super().__init__()
        self.num_classes = num_classes  # logit channels, including the no-object slot
        self.weights = weights

    def single_output_losses(
        self, outputs: Mapping[str, torch.Tensor], flat: Dict[str, Any], num_groups: int, normaliser: float
    ) -> Dict[str, torch.Tensor]:
        w = self.weights
        matches = match_outputs(outputs, flat, w, num_groups)
        logits = outputs["pred_logits"].float()
        offsets = np.cumsum([0] + list(flat["sizes"]))[:-1]
        # (image, query, target-in-batch) of every matched pair, moved to the device in one copy.
        index = torch.cat(
            [torch.stack([torch.full_like(q, b), q, c + int(offsets[b])]) for b, (q, c) in enumerate(matches)], dim=1
        ).to(logits.device, non_blocking=True)
        batch_idx, query_idx, target_idx = index.unbind(0)

        positives = (batch_idx, query_idx, flat["labels"][target_idx])
        src_boxes = outputs["pred_boxes"].float()[batch_idx, query_idx]
        tgt_boxes = flat["boxes"][target_idx]
        src_xyxy, tgt_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)
        if w.classification == "ia_bce":
            quality = elementwise_iou(src_xyxy, tgt_xyxy)
            cls = iou_aware_bce(logits, positives, quality, w.focal_alpha, w.focal_gamma)
        else:
            onehot = torch.zeros_like(logits)
            onehot[positives] = 1.0
            cls = sigmoid_focal_loss(logits, onehot, w.focal_alpha, w.focal_gamma)
        losses = {"cls": cls.sum() / normaliser}
        losses["bbox"] = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / normaliser
        losses["giou"] = (1 - elementwise_giou(src_xyxy, tgt_xyxy)).sum() / normaliser

        if outputs.get("pred_masks") is not None and "masks" in flat:
            src_masks = outputs["pred_masks"][batch_idx, query_idx].float().flatten(1)
            tgt_masks = flat["masks"][target_idx]
            bce = F.binary_cross_entropy_with_logits(src_masks, tgt_masks, reduction="none").mean(1)
            losses["mask_bce"] = bce.sum() / normaliser
            losses["mask_dice"] = dice_loss(src_masks, tgt_masks).sum() / normaliser
        else:
            losses["mask_bce"] = losses["mask_dice"] = logits.sum() * 0.0
        return losses

    def forward(
        self, outputs: Mapping[str, object], targets: Sequence[Target], num_groups: int = 1
    ) -> Dict[str, torch.Tensor]:
        """Weighted total under ``"loss"``; per-term sums over all output sets under the term
        names (``cls``, ``bbox``, ``giou``, ``mask_bce``, ``mask_dice``) and the final layer's
        terms under ``final/<term>``, all detached."""
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} channels, criterion expects {self.num_classes}")
        masks = outputs.get("pred_masks")
        # Ground-truth masks are downsampled once, to the grid all output sets share.
        flat = concat_targets(targets, tuple(masks.shape[-2:]) if masks is not None else None)
        # Normalise by the number of positives (objects x groups), the DETR convention, so the
        # loss scale does not depend on batch size, object count or group count.
        normaliser = max(float(sum(flat["sizes"]) * num_groups), 1.0)

        sets: List[Tuple[str, Mapping[str, torch.Tensor], float]] = [("final", outputs, 1.0)]
        for i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            sets.append((f"aux{i}", aux, 1.0))
        if outputs.get("enc_outputs") is not None:
            sets.append(("enc", outputs["enc_outputs"], self.weights.encoder))

        total = logits.new_zeros((), dtype=torch.float32)
        report: Dict[str, torch.Tensor] = {term: total.new_zeros(()) for term in TERMS}
        for name, output, scale in sets:
            losses = self.single_output_losses(output, flat, num_groups, normaliser)
            for term in TERMS:
                total = total + scale * getattr(self.weights, term) * losses[term]
                report[term] = report[term] + losses[term].detach()
                if name == "final":
                    report[f"final/{term}"] = losses[term].detach()
        report["loss"] = total
        return report


def scene_targets(
    masks: np.ndarray, classes: np.ndarray, boxes_xyxy: np.ndarray, height: int, width: int
) -> Dict[str, torch.Tensor]:
    """Criterion target from a scene's arrays (bool masks, class ids, xyxy pixel boxes)."""
    scale = np.array([width, height, width, height], np.float32)
    boxes = torch.from_numpy(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4) / scale)
    return {
        "labels": torch.from_numpy(np.asarray(classes, np.int64).reshape(-1)),
        "boxes": box_xyxy_to_cxcywh(boxes),
        "masks": torch.from_numpy(np.asarray(masks, bool)),
    }
