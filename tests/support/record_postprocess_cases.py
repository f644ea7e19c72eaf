"""Record engine outputs of the demo model for the fused-postprocess equality test.

    python tests/support/record_postprocess_cases.py --model "$(python -m inference_fastpath.examples.demo_model | head -1)" --out tests/data/postprocess

Runs the demo RF-DETR-seg-nano package's own ``pre_process`` + ``forward`` (the reference
preprocess and engine stages, on the CPU) on frames of ``examples/data/clip.mp4`` and saves one
``.pt`` per case (``support/recorded_outputs.py``: float16 masks, unreadable planes
zeroed): real outputs with their real ``PreProcessingMetadata`` (stretch, letterbox and
fit-longer-edge through a dataset-version resize, static crop, a batch of 2) and adversarial
variants of frame 0's outputs: no detection, every query above the threshold (with and
without a cap), exact score ties (also cut by the cap), many classes for one query, empty /
border / 1-pixel-wide masks, tiny and 4K frames. ``tests/test_postprocess_fused_stage.py``
requires the fused stage to equal inference-models' postprocess on each, in every mask format.

Each case is checked to be supported by the stage, and (unless ``--no-verify``) run through it
here: a case whose result differs from the reference on this device goes to
``<out>_failing/`` (not read by the test) with the mismatch in ``info["mismatch"]``. Exact
score ties go to ``<out>_ties/``: the kernels replay CUDA's top-k tie order, so the test
compares them on CUDA and checks the CPU stage refuses them (its fallback gives the reference).

The Triton interpreter costs ~0.5 s per detection and format for a 768x576 frame on a CPU,
so most cases use clip frames downscaled before the model (real outputs, smaller frames),
small synthetic frames or a ``max_detections`` cap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # FusedPostprocess.unsupported_reason needs it
os.environ.setdefault("ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES", "True")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `support.*` from tests/

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from inference_models.models.common.roboflow.model_packages import (  # noqa: E402
    PreProcessingMetadata,
    ResizeMode,
    StaticCrop,
    TrainingInputSize,
)
from torchvision.transforms import functional as tvf  # noqa: E402

from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs  # noqa: E402
from inference_fastpath.adapters.engine.reference import ReferenceEngine  # noqa: E402
from inference_fastpath.adapters.postprocess.fused import FusedPostprocess  # noqa: E402
from support.postprocess_cases import frames_mismatch, make_metadata, reference_detections  # noqa: E402
from inference_fastpath.adapters.preprocess.reference import ReferencePreprocess  # noqa: E402
from support.recorded_outputs import (  # noqa: E402
    load_recorded_outputs,
    padding_cells,
    save_recorded_outputs,
)
from inference_fastpath.workflows.video_files import read_frames  # noqa: E402

CONFIDENCE = 0.4  # the demo model's threshold (inference-models' default RF-DETR confidence)
NUM_CLASSES = 10  # the demo package's classes (checked against the loaded model in main)
CLIP = Path(__file__).resolve().parents[2] / "examples" / "data" / "clip.mp4"


def read_clip_frames(clip, indices):
    frames = read_frames(clip)
    return [frames[i] for i in indices]
FRAMES = (0, 60, 119)  # clip frames used (the clip has 120)
FORMATS = ("dense", "rle", "polygon")
SMALL = (192, 144)  # (w, h) of the downscaled clip frames (768x576 / 4)


@dataclass
class Case:
    name: str
    raw: RawOutputs
    metadata: List[PreProcessingMetadata]
    description: str
    threshold: float = CONFIDENCE
    max_detections: Optional[int] = None
    source: str = "derived"  # "real": engine outputs and metadata as produced
    exact_ties: bool = False  # written to <out>_ties: compared on CUDA, a fallback on the CPU


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@contextlib.contextmanager
def _pre_processing(model: Any, resize: Optional[Tuple[ResizeMode, int, int]] = None,
                    static_crop: Optional[StaticCrop] = None) -> Iterator[None]:
    """Temporarily run the model's own pre_process with a static crop and/or a dataset-version
    resize ``(mode, width, height)``: RF-DETR letterboxes (or fits) the frame into that size,
    then stretches it to the network input, recording the padding and
    ``nonsquare_intermediate_size`` in the metadata (its only non-stretch route)."""
    saved = model._inference_config  # inference-models keeps the package's config here
    network_input = saved.network_input
    if resize is not None:
        mode, width, height = resize
        network_input = network_input.model_copy(update={
            "resize_mode": mode, "dataset_version_resize_dimensions": TrainingInputSize(height=height, width=width)})
    image_pre_processing = saved.image_pre_processing
    if static_crop is not None:
        image_pre_processing = image_pre_processing.model_copy(update={"static_crop": static_crop})
    model._inference_config = saved.model_copy(
        update={"network_input": network_input, "image_pre_processing": image_pre_processing})
    try:
        yield
    finally:
        model._inference_config = saved


def run_engine(model: Any, frames: Sequence[np.ndarray], **pre_processing: Any
               ) -> Tuple[RawOutputs, List[PreProcessingMetadata]]:
    """Reference preprocess + engine stages on BGR frames -> (cloned outputs, metadata)."""
    with _pre_processing(model, **pre_processing), torch.inference_mode():
        batch = ReferencePreprocess(model)(list(frames))
        raw = ReferenceEngine(model)(batch)
    return _copy(raw), batch.metadata  # a copy: inference-mode tensors cannot be edited later


def _copy(raw: RawOutputs) -> RawOutputs:
    return RawOutputs(boxes=raw.boxes.clone(), logits=raw.logits.clone(), masks=raw.masks.clone())


def selected_order(raw: RawOutputs, threshold: float = CONFIDENCE) -> List[int]:
    """Queries of frame 0 whose best named class passes ``threshold``, best first."""
    best = torch.sigmoid(raw.logits[0, :, :NUM_CLASSES]).max(-1).values
    order = torch.argsort(best, descending=True, stable=True)
    return [int(q) for q in order if best[q] > threshold]


def _ridge_value(target_hw: Tuple[int, int], grid: int, axis: int) -> float:
    """Smallest ridge height (over a -6 floor) that stays exactly 1 pixel wide after the
    reference's bilinear resize of a ``grid`` x ``grid`` plane to ``target_hw``."""
    for value in np.arange(0.05, 6.0, 0.05):
        plane = torch.full((grid, grid), -6.0)
        if axis == 1:
            plane[:, grid // 2] = float(value)
        else:
            plane[grid // 2, :] = float(value)
        up = tvf.resize(plane[None], list(target_hw), interpolation=tvf.InterpolationMode.BILINEAR)[0] > 0
        width = up.sum(dim=axis)
        if int(width.max()) == 1 and int(width.min()) == 1:
            return float(value)
    raise RuntimeError(f"no 1-pixel-wide ridge for {target_hw}")


def build_cases(model: Any, clip: Path) -> List[Case]:
    frames = read_clip_frames(clip, FRAMES)
    full_h, full_w = frames[0].shape[:2]
    small = [cv2.resize(f, SMALL, interpolation=cv2.INTER_AREA) for f in frames]
    L = _logit(CONFIDENCE)
    cases: List[Case] = []

    def real(name: str, description: str, raw: RawOutputs, meta, **kw: Any) -> None:
        cases.append(Case(name, raw, list(meta), description, source="real", **kw))

    # ---- real outputs with the real metadata
    raw0, meta0 = run_engine(model, frames[:1])
    real("real_f000_full", f"clip frame 0 at {full_w}x{full_h}; the 3 best of its detections (cap keeps "
         "the CPU interpreter fast)", raw0, meta0, max_detections=3)
    mixed = [small[2], cv2.resize(frames[0], (160, 96), interpolation=cv2.INTER_AREA)]
    raw_b, meta_b = run_engine(model, mixed)
    real("real_batch2", "batch of 2: clip frame 119 at 192x144 and frame 0 squeezed to 160x96", raw_b, meta_b)
    raw_l, meta_l = run_engine(model, small[1:2], resize=(ResizeMode.LETTERBOX, 320, 320))
    real("real_letterbox", "clip frame 60 at 192x144, letterboxed into 320x320 by the model's pre_process "
         "(dataset-version resize), then stretched to 312x312", raw_l, meta_l)
    raw_f, meta_f = run_engine(model, small[1:2], resize=(ResizeMode.FIT_LONGER_EDGE, 416, 256))
    real("real_fit_longer_edge", "clip frame 60 at 192x144, fit into 416x256 (non-square intermediate "
         "size, no padding) by the model's pre_process", raw_f, meta_f)
    crop = StaticCrop(enabled=True, x_min=10, x_max=80, y_min=25, y_max=95)
    raw_c, meta_c = run_engine(model, small[2:3], static_crop=crop)
    real("real_static_crop", "clip frame 119 at 192x144, static crop x 10-80% y 25-95% (pre_process)",
         raw_c, meta_c)
    raw_lc, meta_lc = run_engine(model, small[0:1], resize=(ResizeMode.LETTERBOX, 416, 256),
                                 static_crop=StaticCrop(enabled=True, x_min=0, x_max=100, y_min=30, y_max=70))
    real("real_letterbox_static_crop", "clip frame 0 at 192x144, static crop y 30-70%, then letterboxed "
         "into 416x256 by the model's pre_process", raw_lc, meta_lc)

    # ---- adversarial variants of frame 0's outputs (synthetic metadata where the size matters)
    base = raw0
    sel = selected_order(base)
    unsel = [q for q in range(base.logits.shape[1]) if q not in sel]
    small_meta = [make_metadata((96, 128))]  # the frame of most variants: cheap for the interpreter
    top = float(torch.sigmoid(base.logits[0, :, :NUM_CLASSES]).max())
    cases.append(Case("adv_no_detection", base, list(meta0), f"threshold 0.99 above every score (max {top:.4f})",
                      threshold=0.99))

    every = _copy(base)
    best = every.logits[0, :, :NUM_CLASSES].argmax(-1)
    best_logit = every.logits[0, torch.arange(best.numel()), best]
    # the same shift for every query's best class keeps their real order
    every.logits[0, torch.arange(best.numel()), best] = best_logit + (L + 0.25 - float(best_logit.min()))
    # a letterboxed 64x24 frame reads ~1/3 of each mask plane: 100 masks stay cheap to store and run
    cases.append(Case("adv_every_query_above", every, [make_metadata((24, 64), mode="letterbox")],
                      "every query's best class raised above the threshold (no cap); 64x24 letterboxed"))
    cases.append(Case("adv_every_query_above_cap", every, small_meta,
                      "every query's best class above the threshold, max_detections=20; 128x96 frame",
                      max_detections=20))

    ties = _copy(base)
    ties.logits[0, unsel[0]] = ties.logits[0, sel[1]]  # same class and score, other box and mask
    for q in unsel[1:3]:
        ties.logits[0, q] = ties.logits[0, sel[3]]  # a tie of three
    c = int(ties.logits[0, sel[5], :NUM_CLASSES].argmax())
    ties.logits[0, sel[5], (c + 1) % NUM_CLASSES] = ties.logits[0, sel[5], c]  # two classes of one query
    cases.append(Case("adv_score_ties", ties, small_meta,
                      "exact score ties: copied logits rows (2 and 3 queries), two classes of one query",
                      exact_ties=True))
    # cap right inside the three-way tie: which tied queries survive is decided by the order
    request = PostprocessRequest(CONFIDENCE, None, "rle")
    conf = reference_detections(ties, small_meta, request, NUM_CLASSES)[0].confidence
    first = next(i for i in range(len(conf) - 2) if conf[i] == conf[i + 1] == conf[i + 2])
    cases.append(Case("adv_score_ties_cap", ties, small_meta,
                      f"the same ties with max_detections={first + 2} cutting the three-way tie",
                      max_detections=first + 2, exact_ties=True))

    many = _copy(base)
    many.logits[0, sel[0], :NUM_CLASSES] = L + torch.linspace(0.3, 3.0, NUM_CLASSES)  # no ties: see adv_score_ties
    many.logits[0, sel[1], NUM_CLASSES:] = float(many.logits[0, sel[1]].max()) + 1.0  # no-object wins
    many.logits[0, unsel[0], NUM_CLASSES:] = L + 2.0  # only no-object above the threshold: dropped
    cases.append(Case("adv_many_classes", many, small_meta,
                      "one query above the threshold for all 10 classes; no-object class on top for a "
                      "selected query and alone above it for another; 128x96 frame"))

    empty = _copy(base)
    plane = empty.masks[0, sel[0]]
    empty.masks[0, sel[0]] = plane - plane.max() - 1.0  # all negative
    empty.masks[0, sel[1]] = 0.0  # exact zeros: background (strict > 0)
    empty.masks[0, sel[2]] = -8.0
    empty.masks[0, sel[2], 40, 40] = 0.01  # a barely positive cell: vanishes in the resize
    cases.append(Case("adv_empty_masks", empty, small_meta,
                      "selected queries with an all-negative mask, an all-zero mask and a -8 mask with "
                      "one barely positive cell"))

    def with_borders(meta: PreProcessingMetadata) -> RawOutputs:
        """Masks positive along the 4 borders of the grid region the frame reads, over all of
        it, and only in two opposite corners of it."""
        out = _copy(base)
        mh, mw = base.masks.shape[-2:]
        t, b, l, r = padding_cells(meta, mh, mw)
        region = out.masks[0, :, t:mh - b, l:mw - r]  # a view
        for q in sel[:2]:
            region[q, 0, :] = region[q, -1, :] = 4.0
            region[q, :, 0] = region[q, :, -1] = 4.0
        region[sel[2]] = 2.0
        region[sel[3]] = -6.0
        region[sel[3], 0, 0] = region[sel[3], -1, -1] = 6.0
        return out

    cases.append(Case("adv_border_masks", with_borders(small_meta[0]), small_meta,
                      "masks positive along the 4 frame borders, over the whole frame, and only in "
                      "two opposite corners"))
    lb = [make_metadata((72, 192), mode="letterbox")]
    cases.append(Case("adv_border_masks_letterbox", with_borders(lb[0]), lb,
                      "the same on a 192x72 letterboxed frame: positive next to the padding"))

    thin = _copy(base)
    grid = int(base.masks.shape[-1])
    target = (96, 128)
    v_col, v_row = _ridge_value(target, grid, axis=1), _ridge_value(target, grid, axis=0)
    thin.masks[0, sel[0]] = -6.0
    thin.masks[0, sel[0], :, grid // 2] = v_col
    thin.masks[0, sel[1]] = -6.0
    thin.masks[0, sel[1], grid // 2, :] = v_row
    thin.masks[0, sel[2]] = -6.0
    thin.masks[0, sel[2], 10:60, 20] = v_col  # a partial 1-pixel column
    thin.masks[0, sel[2], 30, 25:70] = v_row  # and row
    cases.append(Case("adv_one_pixel_wide", thin, small_meta,
                      f"masks whose positive region is 1 pixel wide/high after the resize to 128x96 "
                      f"(ridge logits {v_col:.2f} / {v_row:.2f} over -6)"))

    cases.append(Case("adv_tiny_frame", base, [make_metadata((20, 30))],
                      "30x20 frame: smaller than the 78x78 mask grid (antialiased downscale)"))
    cases.append(Case("adv_tiny_frame_letterbox", base, [make_metadata((9, 30), mode="letterbox")],
                      "30x9 letterboxed frame"))
    cases.append(Case("adv_4k", base, [make_metadata((2160, 3840))],
                      "3840x2160 frame, best detection only (max_detections=1)", max_detections=1))
    return cases


def check_supported(case: Case, stage: FusedPostprocess) -> None:
    for fmt in FORMATS:
        request = PostprocessRequest(case.threshold, case.max_detections, fmt)
        reason = stage.unsupported_reason(case.metadata, request, case.raw)
        if reason is not None and not (case.exact_ties and "ties" in reason):
            raise RuntimeError(f"{case.name}: the fused stage would refuse it ({reason})")


def mismatches(path: Path, stage: FusedPostprocess) -> Dict[str, str]:
    """{format: mismatch text} of the fused stage vs the reference on a saved case, as the test
    runs it (on the stored float16 / pruned data)."""
    raw, metadata, info = load_recorded_outputs(str(path), stage.device)
    found = {}
    for fmt in FORMATS:
        request = PostprocessRequest(info["threshold"], info["max_detections"], fmt)
        ours = stage(raw, metadata, request)
        ref = reference_detections(raw, metadata, request, NUM_CLASSES)
        problems = [f"frame {i}: {p}" for i, (o, r) in enumerate(zip(ours, ref)) if (p := frames_mismatch(o, r))]
        if problems:
            found[fmt] = "; ".join(problems)
    return found


def check_pruning(case: Case, path: Path) -> None:
    """The zeroed mask planes / padding cells must not change the reference's result."""
    loaded, metadata, _ = load_recorded_outputs(str(path))
    rounded = RawOutputs(boxes=case.raw.boxes, logits=case.raw.logits, masks=case.raw.masks.half().float())
    for fmt in FORMATS:
        request = PostprocessRequest(case.threshold, case.max_detections, fmt)
        for a, b in zip(reference_detections(rounded, case.metadata, request, NUM_CLASSES),
                        reference_detections(loaded, metadata, request, NUM_CLASSES)):
            problem = frames_mismatch(a, b)
            if problem:
                raise RuntimeError(f"{case.name}: pruning changed the reference result ({fmt}: {problem})")


def save_case(case: Case, out: Path, made_by: Dict[str, Any], **extra: Any) -> Path:
    request = PostprocessRequest(case.threshold, case.max_detections, "rle")
    counts = [len(f) for f in reference_detections(case.raw, case.metadata, request, NUM_CLASSES)]
    info = {
        "threshold": case.threshold,
        "num_classes": NUM_CLASSES,
        "max_detections": case.max_detections,
        "description": case.description,
        "source": case.source,
        "reference_detections": counts,
        "made_by": made_by,
        **extra,
    }
    path = out / f"{case.name}.pt"
    save_recorded_outputs(str(path), case.raw, case.metadata, info, mask_dtype=torch.float16, prune=True)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/postprocess"))
    parser.add_argument("--failing-out", type=Path, default=None,
                        help="cases the fused stage does not reproduce here (default: <out>_failing)")
    parser.add_argument("--no-verify", action="store_true",
                        help="write every case to --out without running the fused stage on it")
    parser.add_argument("--model", type=Path, required=True,
                        help="the demo package (`python -m inference_fastpath.examples.demo_model` prints it)")
    parser.add_argument("--clip", type=Path, default=CLIP)
    parser.add_argument("--only", nargs="*", default=None, help="case names to write (default: all)")
    args = parser.parse_args(argv)
    from importlib.metadata import version

    from inference_models import AutoModel

    clip = args.clip
    failing_out = args.failing_out or args.out.with_name(args.out.name + "_failing")
    model = AutoModel.from_pretrained(str(args.model), device=torch.device("cpu"))
    if len(model.class_names) != NUM_CLASSES:
        raise SystemExit(f"{args.model} has {len(model.class_names)} classes; the cases assume {NUM_CLASSES}")
    made_by = {
        "script": "python tests/support/record_postprocess_cases.py --model <demo package>",
        "model": "demo RF-DETR-seg-nano package, seed 0 (random weights, calibrated head)",
        "clip": clip.name,
        "engine": "model.pre_process + model.forward (reference stages), CPU",
        "storage": "masks float16 (loaded as float32), unselectable query planes and padding zeroed",
        "torch": str(torch.__version__),
        "inference_models": version("inference-models"),
    }
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage = FusedPostprocess(NUM_CLASSES, None, device)
    args.out.mkdir(parents=True, exist_ok=True)
    ties_out = args.out.with_name(args.out.name + "_ties")
    for case in build_cases(model, clip):
        if args.only and case.name not in args.only:
            continue
        check_supported(case, stage)
        out = ties_out if case.exact_ties else args.out
        for stale in (out / f"{case.name}.pt", failing_out / f"{case.name}.pt"):
            stale.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        path = save_case(case, out, made_by)
        check_pruning(case, path)
        # exact ties are only reproduced on CUDA (the CPU stage refuses them; the test checks that)
        skip = args.no_verify or (case.exact_ties and device.type == "cpu")
        found = {} if skip else mismatches(path, stage)
        if found:  # kept, with the mismatch, out of the test's folder
            path.unlink()
            failing_out.mkdir(parents=True, exist_ok=True)
            path = save_case(case, failing_out, made_by, mismatch=found, mismatch_device=str(device))
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB  {case.description}")
        for fmt, text in found.items():
            print(f"    MISMATCH {fmt}: {text}")


if __name__ == "__main__":
    main()
