"""Fused selection vs inference-models' RF-DETR segmentation postprocess.

Runs on CUDA when available, else through the Triton interpreter (CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from inference_models.entities import ImageDimensions
from inference_models.models.common.roboflow.model_packages import ClassNameRemoval
from inference_models.models.rfdetr.class_remapping import prepare_class_remapping

from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs
from support.postprocess_cases import make_metadata, reference_detections, synthetic_outputs
from inference_fastpath.kernels.frame_geometry import frame_geometry
from inference_fastpath.kernels.postprocess_select import decode_selection, select_detections

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_CLASSES = 90  # RF-DETR COCO head: 91 logits, id 90 is "no object"


def _ours(raw, metadata, threshold, max_detections=None, num_classes=NUM_CLASSES, remap=None):
    mh, mw = raw.masks.shape[-2:]
    geoms = [frame_geometry(m, mh, mw) for m in metadata]
    mapping = None if remap is None else remap.class_mapping
    buf = select_detections(raw.logits, raw.boxes, geoms, threshold, num_classes, mapping, max_detections)
    return decode_selection(buf.packed.cpu().numpy(), buf.capacity)


def _reference(raw, metadata, threshold, max_detections=None, num_classes=NUM_CLASSES, remap=None):
    req = PostprocessRequest(threshold=threshold, max_detections=max_detections, mask_format="dense")
    return reference_detections(raw, metadata, req, num_classes, remap)


def _assert_same(ours, refs, tie_tolerant=False):
    assert len(ours) == len(refs)
    for o, r in zip(ours, refs):
        assert len(o.confidence) == len(r.confidence)
        np.testing.assert_array_equal(o.confidence, r.confidence)
        rows_o = list(zip(o.class_id.tolist(), map(tuple, o.xyxy.tolist())))
        rows_r = list(zip(r.class_id.tolist(), map(tuple, r.xyxy.tolist())))
        if tie_tolerant:  # any order within groups of equal confidence
            rows_o = sorted(zip(o.confidence.tolist(), rows_o))
            rows_r = sorted(zip(r.confidence.tolist(), rows_r))
        assert rows_o == rows_r


def _small_masks(raw, hw=(12, 12)):
    """Selection does not look at masks; shrink them so the reference runs fast."""
    return RawOutputs(boxes=raw.boxes, logits=raw.logits, masks=raw.masks[..., : hw[0], : hw[1]].contiguous())


def _to(raw):
    return RawOutputs(boxes=raw.boxes.to(DEVICE), logits=raw.logits.to(DEVICE), masks=raw.masks.to(DEVICE))


# ----------------------------------------------------------------------------- oracle


def cuda_bitonic_order(keys):
    """Python transcription of PyTorch's bitonicSortKVInPlace (sort_size 32, descending):
    the order torch.sort(descending=True) gives on CUDA for 2 <= n <= 32."""
    n = len(keys)
    k = list(keys) + [0.0] * (32 - n)
    v = list(range(32))
    valid = [True] * n + [False] * (32 - n)

    def exchange(a, b, direction):
        swap = (k[a] > k[b] and valid[a]) or not valid[b]
        if swap == direction:
            k[a], k[b] = k[b], k[a]
            v[a], v[b] = v[b], v[a]
            valid[a], valid[b] = valid[b], valid[a]

    size = 2
    while size < 32:
        stride = size // 2
        while stride > 0:
            for t in range(16):
                pos = 2 * t - (t & (stride - 1))
                exchange(pos, pos + stride, (t & (size // 2)) != 0)
            stride //= 2
        size *= 2
    stride = 16
    while stride > 0:
        for t in range(16):
            pos = 2 * t - (t & (stride - 1))
            exchange(pos, pos + stride, False)
        stride //= 2
    return v[:n]


def oracle(scores, threshold, num_classes=NUM_CLASSES, max_detections=None, mapping=None):
    """CUDA semantics of the reference selection: (query, class, score) rows."""
    Q, C = scores.shape
    flat = scores.reshape(-1)
    rank_value = np.where(np.isnan(flat), np.inf, flat).astype(np.float64)  # NaN ranks first
    order = np.lexsort((np.arange(flat.size), -rank_value))[:Q]
    cls = order % C
    if mapping is not None:
        mapping = np.asarray(mapping)
        mapped = np.where(cls < len(mapping), mapping[np.minimum(cls, len(mapping) - 1)], -1)
    else:
        mapped = np.where(cls < num_classes, cls, -1)
    valid = mapped >= 0
    thr = (
        np.asarray(threshold, np.float32)[np.maximum(mapped, 0)]
        if isinstance(threshold, (np.ndarray, list))
        else np.float32(threshold)
    )
    keep = valid & (flat[order] > thr)
    kept, kept_cls = order[keep], mapped[keep]
    if 2 <= len(kept) <= 32:
        perm = cuda_bitonic_order(flat[kept].tolist())
        kept, kept_cls = kept[perm], kept_cls[perm]
    if max_detections is not None:
        kept, kept_cls = kept[:max_detections], kept_cls[:max_detections]
    return [(int(f // C), int(c), float(flat[f])) for f, c in zip(kept, kept_cls)]


def _ours_rows(sel):
    return [(int(q), int(c), float(s)) for q, c, s in zip(sel.query, sel.class_id, sel.confidence)]


# ----------------------------------------------------------------------------- tests


def test_realistic_nano_shapes_match_reference():
    raw = _to(synthetic_outputs(queries=100, classes=91, mask_hw=(78, 78), n_confident=12, seed=3))
    meta = [make_metadata((480, 640))]
    _assert_same(_ours(raw, meta, 0.5), _reference(_small_masks(raw), meta, 0.5))


@pytest.mark.parametrize(
    "meta",
    [
        make_metadata((120, 200), mode="letterbox"),
        make_metadata((300, 260), mode="letterbox", static_crop=(30, 20, 200, 150)),
        make_metadata((64, 64), inference_hw=(64, 64)),  # no resize: x.5 coordinates, half-even
        make_metadata((120, 200), mode="letterbox")._replace(
            nonsquare_intermediate_size=ImageDimensions(height=312, width=520)
        ),
    ],
    ids=["letterbox", "letterbox+static-crop", "identity", "nonsquare-intermediate"],
)
def test_geometries_match_reference(meta):
    raw = _to(synthetic_outputs(n_confident=20, seed=5))
    # boxes that leave the frame exercise the clamp
    raw.boxes[0, :5, :2] = torch.tensor([0.02, 0.98], device=DEVICE)
    raw.boxes[0, :5, 2:] = 0.3
    if meta.inference_size.width == 64:
        # dyadic centres/sizes -> many coordinates land exactly on .5 (round half to even)
        raw.boxes[0] = torch.randint(1, 120, raw.boxes[0].shape, device=DEVICE).float() / 128
    _assert_same(_ours(raw, [meta], 0.3), _reference(_small_masks(raw), [meta], 0.3))


def test_unrounded_boxes_when_canvas_exceeds_frame():
    # static crop sticking out of the frame: the mask canvas is bigger than the image,
    # the reference keeps float boxes
    meta = make_metadata((100, 100), static_crop=(40, 30, 80, 90))
    raw = _to(synthetic_outputs(n_confident=15, seed=8))
    ours = _ours(raw, [meta], 0.4)
    ref = _reference(_small_masks(raw), [meta], 0.4)
    assert np.any(ours[0].xyxy != np.round(ours[0].xyxy))
    _assert_same(ours, ref)


def test_batch_with_mixed_metadata():
    raw = _to(synthetic_outputs(batch=3, n_confident=9, seed=11))
    meta = [make_metadata((64, 96)), make_metadata((96, 64), mode="letterbox"), make_metadata((50, 50))]
    _assert_same(_ours(raw, meta, 0.45), _reference(_small_masks(raw), meta, 0.45))


def test_all_scores_below_threshold():
    raw = _to(synthetic_outputs(n_confident=0, seed=1))
    meta = [make_metadata((64, 64))]
    ours = _ours(raw, meta, 0.5)
    assert len(ours[0].confidence) == 0
    _assert_same(ours, _reference(_small_masks(raw), meta, 0.5))


def test_every_query_and_many_classes_above_threshold():
    # 100 queries x 91 classes all in (0.5, 1): the top-k (k = 100) decides who stays
    gen = torch.Generator().manual_seed(2)
    raw = synthetic_outputs(seed=2)
    raw.logits = torch.rand(raw.logits.shape, generator=gen) * 4 + 0.1
    raw = _to(raw)
    meta = [make_metadata((80, 120))]
    ours = _ours(raw, meta, 0.5)
    assert len(ours[0].confidence) > 90  # id 90 ("no object") rows take some top-k slots
    _assert_same(ours, _reference(_small_masks(raw), meta, 0.5))


def test_many_classes_per_query():
    raw = synthetic_outputs(seed=4)
    raw.logits[0, :6, :40] = torch.linspace(0.2, 5.0, 240).view(6, 40)  # 6 queries x 40 classes
    raw = _to(raw)
    meta = [make_metadata((64, 80))]
    _assert_same(_ours(raw, meta, 0.6), _reference(_small_masks(raw), meta, 0.6))


def test_per_class_thresholds():
    raw = _to(synthetic_outputs(n_confident=40, seed=6))
    thr = torch.linspace(0.3, 0.95, NUM_CLASSES)
    meta = [make_metadata((70, 70))]
    _assert_same(_ours(raw, meta, thr), _reference(_small_masks(raw), meta, thr))


def test_class_remapping():
    names = [f"c{i}" for i in range(NUM_CLASSES)]
    removed = [ClassNameRemoval(type="class_name_removal", class_name=f"c{i}") for i in (0, 3, 7, 8, 50)]
    _, remap = prepare_class_remapping(names, removed, DEVICE)
    raw = synthetic_outputs(n_confident=30, seed=7)
    raw.logits[0, :10, [0, 3, 7, 8, 50]] = 5.0  # removed classes score high
    raw = _to(raw)
    meta = [make_metadata((60, 90))]
    thr = torch.linspace(0.2, 0.6, NUM_CLASSES - 5)
    for threshold in (0.4, thr):
        ours = _ours(raw, meta, threshold, remap=remap)
        _assert_same(ours, _reference(_small_masks(raw), meta, threshold, remap=remap))


@pytest.mark.parametrize("cap", [0, 1, 3, 100])
def test_max_detections(cap):
    raw = _to(synthetic_outputs(n_confident=25, seed=9))
    meta = [make_metadata((60, 60))]
    ours = _ours(raw, meta, 0.4, max_detections=cap)
    uncapped = _ours(raw, meta, 0.4)[0]
    assert len(uncapped.confidence) > 3
    assert len(ours[0].confidence) == min(cap, len(uncapped.confidence))
    assert ours[0].n_before_cap == len(uncapped.confidence)
    _assert_same(ours, _reference(_small_masks(raw), meta, 0.4, max_detections=cap))


def _tied(pattern, seed=0):
    """Outputs whose sigmoid scores contain exact ties."""
    raw = synthetic_outputs(n_confident=0, seed=seed)
    for (q0, q1, c0, c1), value in pattern:
        raw.logits[0, q0:q1, c0:c1] = value
    return raw


TIE_CASES = {
    # n <= 32 after filtering: the reference's final torch.sort is PyTorch's bitonic network
    "small_n_all_equal": [((0, 7, 2, 3), 3.0)],
    "small_n_groups": [((0, 5, 1, 2), 2.0), ((10, 20, 4, 5), 1.5), ((30, 33, 6, 8), 2.0)],
    "saturated": [((0, 12, 9, 10), 40.0), ((40, 45, 1, 2), 30.0)],  # sigmoid == 1.0
    # n > 32: stable sorts, ties in flat-index order
    "large_n": [((0, 50, 3, 4), 2.5), ((50, 60, 5, 6), 2.5)],
    # ties straddling the top-k (k = 100) boundary
    "topk_boundary": [((0, 100, 0, 2), 2.0)],
}


@pytest.mark.parametrize("case", sorted(TIE_CASES))
@pytest.mark.parametrize("cap", [None, 4])
def test_exact_ties(case, cap):
    raw = _to(_tied(TIE_CASES[case]))
    meta = [make_metadata((64, 64))]
    ours = _ours(raw, meta, 0.5, max_detections=cap)
    scores = torch.sigmoid(raw.logits[0]).cpu().numpy()
    # CUDA semantics of the reference, transcribed from PyTorch's topk/sort kernels
    assert _ours_rows(ours[0]) == oracle(scores, 0.5, max_detections=cap)
    ref = _reference(_small_masks(raw), meta, 0.5, max_detections=cap)
    if CUDA:
        _assert_same(ours, ref)
    elif case != "topk_boundary" and cap is None:
        # torch's CPU top-k/sort order ties arbitrarily (see postprocess_select docs)
        _assert_same(ours, ref, tie_tolerant=True)


def test_bitonic_transcription_matches_torch_cuda_sort():
    if not CUDA:
        pytest.skip("checks the transcription against torch.sort on CUDA")
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 33))
        keys = np.sort(rng.choice([0.9, 0.8, 0.7, 0.6], size=n).astype(np.float32))[::-1].copy()
        idx = torch.sort(torch.from_numpy(keys).cuda(), descending=True).indices.cpu().tolist()
        assert idx == cuda_bitonic_order(keys.tolist())


def test_nan_scores_take_topk_slots_but_never_pass():
    raw = synthetic_outputs(n_confident=10, seed=12)
    raw.logits[0, 50:55, 0] = float("nan")
    raw = _to(raw)
    meta = [make_metadata((64, 64))]
    ours = _ours(raw, meta, 0.5)
    scores = torch.sigmoid(raw.logits[0]).cpu().numpy()
    assert _ours_rows(ours[0]) == oracle(scores, 0.5)
