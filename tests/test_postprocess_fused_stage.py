"""FusedPostprocess stage: contract, formats, fallbacks and recorded engine outputs.

Runs on CUDA when available, else through the Triton interpreter (CPU). Recorded
outputs dropped into ``tests/data/postprocess/*.pt`` (see ``save_recorded_outputs``)
are picked up automatically; ``examples/record_postprocess_cases.py`` writes them from
the demo model. Exact score ties (``tests/data/postprocess_ties/``) are compared on CUDA,
whose top-k tie order the kernels replay; on the CPU the stage must refuse them (the CPU
top-k orders ties differently) and the fallback must give the reference result.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import glob

import numpy as np
import pytest
from inference_models.models.common.roboflow.model_packages import ClassNameRemoval
from inference_models.models.rfdetr.class_remapping import prepare_class_remapping

from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs
from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
from support.postprocess_cases import frames_mismatch, make_metadata, reference_detections, synthetic_outputs
from support.recorded_outputs import load_recorded_outputs, save_recorded_outputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_CLASSES = 90
RECORDED = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "postprocess", "*.pt")))
TIES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "postprocess_ties", "*.pt")))


def _device(raw, **extra):
    return RawOutputs(boxes=raw.boxes.to(DEVICE), logits=raw.logits.to(DEVICE), masks=raw.masks.to(DEVICE), **extra)


def _assert_equal(stage, raw, metadata, request, num_classes=NUM_CLASSES, remap=None):
    ours = stage(raw, metadata, request)
    ref = reference_detections(raw, metadata, request, num_classes, remap)
    assert len(ours) == len(ref) == len(metadata)
    for o, r in zip(ours, ref):
        problem = frames_mismatch(o, r)
        assert problem is None, f"{request.mask_format}: {problem}"
    return ours


@pytest.fixture(scope="module")
def stage():
    return FusedPostprocess(NUM_CLASSES, None, DEVICE)


@pytest.mark.parametrize("fmt", ["compact", "dense", "rle"])
def test_batch_of_two_frames_all_formats(stage, fmt):
    raw = _device(synthetic_outputs(batch=2, n_confident=4, seed=21))
    meta = [make_metadata((72, 96), mode="letterbox"), make_metadata((64, 48))]
    ours = _assert_equal(stage, raw, meta, PostprocessRequest(0.5, None, fmt))
    for frame, m in zip(ours, meta):
        assert frame.image_size == (m.original_size.height, m.original_size.width)
        assert frame.xyxy.dtype == np.float32 and frame.xyxy.shape == (len(frame), 4)
        assert frame.confidence.dtype == np.float32 and frame.class_id.dtype == np.int64
        filled = [x is not None for x in (frame.dense_masks, frame.rle_masks, frame.compact_masks)]
        assert filled == [fmt == "dense", fmt == "rle", fmt in ("compact", "rle")]
    if fmt == "dense":
        assert ours[0].dense_masks.dtype == bool and ours[0].dense_masks.shape == (len(ours[0]), 72, 96)


def test_remapping_thresholds_and_cap():
    names = [f"c{i}" for i in range(NUM_CLASSES)]
    _, remap = prepare_class_remapping(
        names, [ClassNameRemoval(type="class_name_removal", class_name=f"c{i}") for i in (1, 2, 40)], DEVICE
    )
    stage = FusedPostprocess(NUM_CLASSES, remap, DEVICE)
    raw = synthetic_outputs(n_confident=12, seed=22)
    raw.logits[0, :4, 1] = 4.0
    raw = _device(raw)
    thr = torch.linspace(0.25, 0.75, NUM_CLASSES - 3)
    meta = [make_metadata((64, 64))]
    _assert_equal(stage, raw, meta, PostprocessRequest(thr, 5, "rle"), remap=remap)
    _assert_equal(stage, raw, meta, PostprocessRequest(0.3, None, "dense"), remap=remap)


@pytest.mark.parametrize("fmt", ["dense", "rle"])
def test_no_detections(stage, fmt):
    raw = _device(synthetic_outputs(n_confident=0, seed=23))
    (frame,) = _assert_equal(stage, raw, [make_metadata((30, 40))], PostprocessRequest(0.99, None, fmt))
    assert len(frame) == 0
    if fmt == "dense":
        assert frame.dense_masks.shape == (0, 30, 40)


def test_release_called_once_after_reading(stage):
    """Released once, as soon as the inputs are copied (with the copy's event on CUDA)."""
    calls = []
    raw = _device(synthetic_outputs(n_confident=2, seed=24), release=lambda event=None: calls.append(event))
    stage(raw, [make_metadata((32, 32))], PostprocessRequest(0.5, None, "rle"))
    assert len(calls) == 1
    assert isinstance(calls[0], torch.cuda.Event) if CUDA else calls[0] is None


def test_refused_call_does_not_release(stage):
    calls = []
    raw = synthetic_outputs(n_confident=2, seed=25)
    raw = RawOutputs(
        boxes=raw.boxes.to(DEVICE), logits=raw.logits.half().to(DEVICE), masks=raw.masks.to(DEVICE),
        release=lambda event=None: calls.append(1),
    )
    with pytest.raises(ValueError):
        stage(raw, [make_metadata((32, 32))], PostprocessRequest(0.5, None, "dense"))
    assert calls == []


def test_done_event_is_waited_on(stage):
    if not CUDA:
        pytest.skip("CUDA events")
    side = torch.cuda.Stream()
    host = synthetic_outputs(n_confident=3, seed=26)
    with torch.cuda.stream(side):
        raw = _device(host)
        torch.cuda._sleep(20_000_000)  # the outputs "arrive" late on another stream
        event = torch.cuda.Event()
        event.record(side)
    raw.done_event = event
    meta = [make_metadata((48, 64))]
    ours = stage(raw, meta, PostprocessRequest(0.5, None, "dense"))
    torch.cuda.synchronize()
    ref = reference_detections(raw, meta, PostprocessRequest(0.5, None, "dense"), NUM_CLASSES)
    assert frames_mismatch(ours[0], ref[0]) is None


def test_unsupported_reasons(stage, monkeypatch):
    meta = [make_metadata((32, 32))]
    ok = PostprocessRequest(0.5, None, "dense")
    raw = _device(synthetic_outputs(n_confident=1, seed=27))
    assert stage.unsupported_reason(meta, ok, raw) is None
    assert "mask_format" in stage.unsupported_reason(meta, PostprocessRequest(0.5, None, "bitmap"))
    assert stage.unsupported_reason(meta, PostprocessRequest(0.5, -1, "dense"))
    assert stage.unsupported_reason(meta, PostprocessRequest(torch.full((10,), 0.5), None, "dense"))
    half = RawOutputs(boxes=raw.boxes, logits=raw.logits.half(), masks=raw.masks)
    assert "float32" in stage.unsupported_reason(meta, ok, half)
    few = RawOutputs(boxes=raw.boxes[:, :32], logits=raw.logits[:, :32], masks=raw.masks[:, :32])
    assert "queries" in stage.unsupported_reason(meta, ok, few)
    assert stage.unsupported_reason(meta * 2, ok, raw)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "CUDA" in stage.unsupported_reason(meta, ok)


def test_recorded_outputs_roundtrip(tmp_path, stage):
    raw = synthetic_outputs(n_confident=3, seed=28)
    meta = [make_metadata((40, 60), mode="letterbox", static_crop=(5, 5, 50, 30))]
    path = str(tmp_path / "sample.pt")
    save_recorded_outputs(path, raw, meta, info={"threshold": 0.5, "num_classes": NUM_CLASSES})
    loaded, loaded_meta, info = load_recorded_outputs(path, DEVICE)
    assert loaded_meta == meta and info["threshold"] == 0.5
    assert torch.equal(loaded.masks.cpu(), raw.masks)
    _assert_equal(stage, loaded, loaded_meta, PostprocessRequest(0.5, None, "rle"))


def test_compact_recorded_outputs(tmp_path, stage):
    """float16 + pruned storage: masks load back as float32, unselectable planes and padding
    cells are zero, and the fused stage still equals the reference on what was loaded."""
    raw = synthetic_outputs(n_confident=3, seed=29)
    meta = [make_metadata((40, 90), mode="letterbox")]
    path = str(tmp_path / "compact.pt")
    save_recorded_outputs(path, raw, meta, info={"threshold": 0.5, "num_classes": NUM_CLASSES},
                          mask_dtype=torch.float16, prune=True)
    loaded, _, info = load_recorded_outputs(path, DEVICE)
    kept = torch.sigmoid(raw.logits[0, :, :NUM_CLASSES]).max(-1).values >= 0.5
    assert loaded.masks.dtype == torch.float32 and info["storage"]["pruned_queries"] == int((~kept).sum()) < 97
    masks = loaded.masks.cpu()[0]
    assert not masks[~kept].any() and not masks[:, :10].any()  # 10 top rows: letterbox padding
    assert torch.equal(masks[kept][:, 30:48], raw.masks[0, kept][:, 30:48].half().float())
    for fmt in ("dense", "rle"):
        _assert_equal(stage, loaded, meta, PostprocessRequest(0.5, None, fmt))


@pytest.mark.parametrize("path", RECORDED or [None], ids=[os.path.basename(p) for p in RECORDED] or ["none"])
@pytest.mark.parametrize("fmt", ["compact", "dense", "rle"])
def test_recorded_engine_outputs(path, fmt):
    if path is None:
        pytest.skip("no recorded outputs in tests/data/postprocess/")
    raw, meta, info = load_recorded_outputs(path, DEVICE)
    num_classes = int(info.get("num_classes", NUM_CLASSES))
    stage = FusedPostprocess(num_classes, None, DEVICE)
    request = PostprocessRequest(float(info.get("threshold", 0.5)), info.get("max_detections"), fmt)
    _assert_equal(stage, raw, meta, request, num_classes=num_classes)


@pytest.mark.parametrize("path", TIES, ids=[os.path.basename(p) for p in TIES])
@pytest.mark.parametrize("fmt", ["compact", "dense", "rle"])
def test_recorded_score_ties(path, fmt):
    from inference_fastpath.adapters.fallback import FallbackStage
    from inference_fastpath.adapters.postprocess.reference import ReferencePostprocess

    raw, meta, info = load_recorded_outputs(path, DEVICE)
    num_classes = int(info.get("num_classes", NUM_CLASSES))
    stage = FusedPostprocess(num_classes, None, DEVICE)
    request = PostprocessRequest(float(info.get("threshold", 0.5)), info.get("max_detections"), fmt)
    if CUDA:
        assert stage.unsupported_reason(meta, request, raw) is None
        _assert_equal(stage, raw, meta, request, num_classes=num_classes)
        return
    assert "ties" in stage.unsupported_reason(meta, request, raw)
    selected = FallbackStage("postprocess", stage, ReferencePostprocess(num_classes=num_classes, classes_re_mapping=None))
    _assert_equal(selected, raw, meta, request, num_classes=num_classes)


@pytest.mark.parametrize("fmt", ["compact", "dense", "rle"])
def test_small_payload_buffers_grow_without_changing_results(monkeypatch, fmt):
    """A payload longer than the copied prefix, then longer than the device buffer, still
    gives the reference result; the stage remembers the larger sizes for the next frame."""
    from inference_fastpath.adapters.postprocess import fused

    monkeypatch.setitem(fused._DEFAULT_SIZES, fused.RUNS, (64, 8))
    monkeypatch.setitem(fused._DEFAULT_SIZES, fused.STRINGS, (64, 8))
    monkeypatch.setitem(fused._DEFAULT_SIZES, fused.DENSE, (64, 8))
    stage = FusedPostprocess(NUM_CLASSES, None, DEVICE)
    raw = _device(synthetic_outputs(n_confident=4, seed=31))
    meta = [make_metadata((48, 64))]
    request = PostprocessRequest(0.5, None, fmt)
    _assert_equal(stage, raw, meta, request)
    (payload, prefix), = stage._sizes.values()
    assert payload > 64 and prefix > 8, stage._sizes
    _assert_equal(stage, _device(synthetic_outputs(n_confident=4, seed=32)), meta, request)


def test_graph_replays_equal_reference_on_changing_inputs():
    if not CUDA:
        pytest.skip("CUDA graphs")
    stage = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=True)
    meta = [make_metadata((720, 1280)), make_metadata((480, 640), mode="letterbox")]
    for seed in range(4):  # first call captures, the next ones replay on new data
        for fmt in ("rle", "dense"):
            _assert_equal(stage, _device(synthetic_outputs(batch=2, n_confident=6, seed=40 + seed)), meta,
                          PostprocessRequest(0.4, 50, fmt))
    assert stage.graph_fallback_reason is None
    assert stage.captures == 2, stage.captures  # one graph per output kind, replayed afterwards
    eager = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=False)
    _assert_equal(eager, _device(synthetic_outputs(n_confident=6, seed=50)), meta[:1],
                  PostprocessRequest(0.4, None, "rle"))
    assert eager.captures == 0


def test_dense_masks_held_by_the_caller_are_never_reused(stage):
    """Dense masks come from recycled buffers: a result still referenced keeps its pixels while
    later calls run; one dropped is recycled (and zeroed) for the next call."""
    meta = [make_metadata((48, 64))]
    request = PostprocessRequest(0.5, None, "dense")
    first = stage(_device(synthetic_outputs(n_confident=4, seed=41)), meta, request)[0].dense_masks
    snapshot = first.copy()
    for seed in (42, 43, 44):
        later = stage(_device(synthetic_outputs(n_confident=4, seed=seed)), meta, request)[0].dense_masks
        assert not np.shares_memory(later, first)
    np.testing.assert_array_equal(first, snapshot)
    allocations = stage._mask_pool.allocations
    del first, later
    stage(_device(synthetic_outputs(n_confident=4, seed=45)), meta, request)
    assert stage._mask_pool.allocations == allocations


@pytest.mark.parametrize("fmt", ["compact", "dense", "rle"])
def test_partial_batches_run_in_padded_programs(fmt):
    """Batches of changing sizes (a batch collection timeout) run in programs of a few padded sizes;
    the padding frames select nothing and every real frame still equals the reference."""
    stage = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=CUDA, pad_partial_batches=True)
    shapes = [(72, 96), (64, 48), (48, 64), (96, 72), (60, 80)]
    request = PostprocessRequest(0.5, None, fmt)
    for seed, batch in enumerate((4, 3, 1, 2, 4, 3)):
        raw = _device(synthetic_outputs(batch=batch, n_confident=3, seed=60 + seed))
        meta = [make_metadata(shapes[(seed + b) % len(shapes)]) for b in range(batch)]
        ours = _assert_equal(stage, raw, meta, request)
        assert len(ours) == batch
    assert sorted({spec.batch for spec in stage._programs.keys()}) == [1, 2, 4]  # 3 ran padded to 4
    padded = stage._programs.peek(stage._last_spec)  # the last call: 3 frames in a program of 4
    assert (padded.rows, padded.spec.batch) == (3, 4)


def test_padded_programs_of_sixteen_sources_all_stay_live():
    """16 sources: partial batches of any size use 5 padded programs (1, 2, 4, 8, 16), and the stage
    keeps them all, so nothing is evicted and captured again."""
    stage = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=CUDA, pad_partial_batches=True)
    request = PostprocessRequest(0.5, None, "compact")
    for seed, batch in enumerate((16, 9, 5, 3, 2, 1, 11, 6)):
        raw = _device(synthetic_outputs(batch=batch, queries=40, mask_hw=(16, 16), n_confident=1, seed=80 + seed))
        _assert_equal(stage, raw, [make_metadata((24, 32))] * batch, request)
    assert sorted(spec.batch for spec in stage._programs.keys()) == [1, 2, 4, 8, 16]
    if CUDA:
        assert stage.graph_summary()["evictions"] == 0, stage.graph_summary()


def _graphs_on_the_cpu(stage):
    """A graph cache whose 'capture' runs the program once and whose 'replay' runs it again, so the
    stage's capture-ahead bookkeeping runs on the CPU as it does on CUDA."""
    from inference_fastpath.adapters.engine.graphs import CapturedGraph, GraphCache

    stage._graphs = GraphCache("cpu stand-in", capture=lambda fn, keep: CapturedGraph(replay=fn, outputs=tuple(fn())),
                               capacity=8, max_captures=16, replay_after_capture=False)


@pytest.mark.parametrize("per_class", [False, True])
def test_padded_programs_are_captured_ahead_once_the_largest_batch_holds(per_class):
    """After the full batch has held for `prepare_after` batches, the programs of the smaller padded
    sizes are built and captured; later partial batches use them (no new program, no capture) and
    still equal the reference. Mixed frame shapes capture nothing ahead."""
    from inference_fastpath.adapters.engine.batch_padding import BatchPadding

    stage = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=CUDA, pad_partial_batches=True)
    if not CUDA:
        _graphs_on_the_cpu(stage)
    stage._padding = BatchPadding(prepare_after=3)
    threshold = torch.full((NUM_CLASSES,), 0.5) if per_class else 0.5
    request = PostprocessRequest(threshold, None, "compact")
    meta = [make_metadata((24, 32))] * 8

    def run(batch, seed):
        raw = _device(synthetic_outputs(batch=batch, queries=40, mask_hw=(16, 16), n_confident=2, seed=seed))
        return _assert_equal(stage, raw, meta[:batch], request)

    for seed in range(2):
        run(8, 100 + seed)
    assert sorted(spec.batch for spec in stage._programs.keys()) == [8] and stage.captures == 1
    run(8, 102)  # the third batch at the largest size: 1, 2 and 4 are captured ahead
    assert sorted(spec.batch for spec in stage._programs.keys()) == [1, 2, 4, 8]
    summary = stage.graph_summary()
    assert (summary["captures"], summary["captured_ahead"]) == (4, 3), summary
    for seed, batch in enumerate((5, 3, 1, 2, 7, 4)):
        assert len(run(batch, 110 + seed)) == batch
    assert sorted(spec.batch for spec in stage._programs.keys()) == [1, 2, 4, 8]
    assert stage.graph_summary()["captures"] == 4  # every partial batch replayed a graph made ahead

    mixed = FusedPostprocess(NUM_CLASSES, None, DEVICE, cuda_graphs=CUDA, pad_partial_batches=True)
    if not CUDA:
        _graphs_on_the_cpu(mixed)
    mixed._padding = BatchPadding(prepare_after=1)
    raw = _device(synthetic_outputs(batch=2, queries=40, mask_hw=(16, 16), n_confident=2, seed=120))
    _assert_equal(mixed, raw, [make_metadata((24, 32)), make_metadata((32, 24))], request)
    assert mixed.graph_summary()["captured_ahead"] == 0 and len(mixed._programs) == 1
    # the mixed batch did not use up the hand-out: the next batch of one shape captures size 1 ahead
    _assert_equal(mixed, raw, [make_metadata((24, 32))] * 2, request)
    assert mixed.graph_summary()["captured_ahead"] == 1
