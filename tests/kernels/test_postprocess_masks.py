"""Fused mask kernels (dense bit-packed, RLE) vs inference-models' reference.

Runs on CUDA when available, else through the Triton interpreter (CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from torchvision.transforms import functional as tvf

from inference_fastpath.adapters.contracts import PostprocessRequest, RawOutputs
from inference_fastpath.adapters.postprocess.fused import FusedPostprocess
from support.postprocess_cases import frames_mismatch, make_metadata, reference_detections, synthetic_outputs
from inference_fastpath.kernels.mask_resize import (
    ACC_MODES,
    NEAR_EXACT_RELATIVE_BOUND,
    axis_taps,
    calibrate_accumulation,
    interp_logits_float,
    probe_axis_taps,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NUM_CLASSES = 90


@pytest.fixture(scope="module")
def stage():
    return FusedPostprocess(NUM_CLASSES, None, DEVICE)


def _check(stage, raw, metadata, formats=("compact", "dense", "rle"), threshold=0.5, max_detections=None):
    raw = RawOutputs(boxes=raw.boxes.to(DEVICE), logits=raw.logits.to(DEVICE), masks=raw.masks.to(DEVICE))
    n = None
    for fmt in formats:
        req = PostprocessRequest(threshold=threshold, max_detections=max_detections, mask_format=fmt)
        assert stage.unsupported_reason(metadata, req, raw) is None
        ours = stage(raw, metadata, req)
        ref = reference_detections(raw, metadata, req, NUM_CLASSES)
        for o, r in zip(ours, ref):
            problem = frames_mismatch(o, r)
            assert problem is None, f"{fmt}: {problem}"
        n = [len(o) for o in ours]
    return n


def _with_masks(raw, fill):
    """Replace the masks of the confident queries with ``fill(h, w)`` logits."""
    masks = raw.masks.clone()
    h, w = masks.shape[-2:]
    masks[:] = fill(h, w)
    return RawOutputs(boxes=raw.boxes, logits=raw.logits, masks=masks)


# ----------------------------------------------------------------------------- resize core


@pytest.mark.parametrize("in_size,out_size", [(78, 312), (78, 78), (60, 1080), (7, 9), (78, 79), (13, 200)])
def test_axis_taps_equal_torch_weights(in_size, out_size):
    # resizing the identity basis along one axis reads the weights back exactly
    eye = torch.eye(in_size, device=DEVICE)[:, None, None, :]
    probed = torch.nn.functional.interpolate(
        eye, size=(1, out_size), mode="bilinear", align_corners=False, antialias=True
    )[:, 0, 0, :].cpu().numpy()
    table, taps = axis_taps(in_size, out_size)
    probed_table, probed_taps = probe_axis_taps(in_size, out_size, DEVICE)
    # The stage uses the taps probed on the device: they must reproduce torch's weights exactly.
    def as_matrix(tap_table):
        matrix = np.zeros((in_size, out_size), dtype=np.float32)
        for o, (first, w0, w1, w2) in enumerate(tap_table):
            for j, w in enumerate((w0, w1, w2)):
                if w != 0:
                    matrix[int(first) + j, o] = w
        return matrix

    np.testing.assert_array_equal(as_matrix(probed_table), probed)
    # The closed form equals them exactly on the CPU; CUDA computes the weights in another float order.
    if DEVICE.type == "cpu":
        np.testing.assert_array_equal(as_matrix(table), probed)
    else:
        np.testing.assert_allclose(as_matrix(table), probed, atol=1e-5, rtol=0)  # H100: max 3.4e-6


def test_calibrated_resize_is_bit_exact():
    recipe = calibrate_accumulation(DEVICE)
    assert recipe.exact, recipe
    mode = recipe.mode
    gen = torch.Generator().manual_seed(0)
    for (gh, gw), (th, tw) in [((78, 78), (240, 320)), ((60, 78), (61, 500)), ((5, 9), (77, 13))]:
        grid = (torch.randn((gh, gw), generator=gen) * 3).to(DEVICE)
        ref = tvf.resize(grid[None], [th, tw], interpolation=tvf.InterpolationMode.BILINEAR)[0]
        assert torch.equal(interp_logits_float(grid, (gh, gw), (th, tw), mode), ref)


def test_other_recipes_flip_signs_only_within_the_near_exact_bound():
    """Grids built so that ``t0*w0 + t1*w1`` nearly cancels at every output column: the recipes
    that torch does not use here do flip thresholded pixels, and only inside the stated bound."""
    exact = calibrate_accumulation(DEVICE).mode
    in_w, out_w, rows = 16, 51, 64
    table, _ = probe_axis_taps(in_w, out_w, DEVICE)
    gen = torch.Generator().manual_seed(3)
    grid = torch.randn((rows, in_w), generator=gen, dtype=torch.float64) * 4
    for column in range(0, out_w, 3):  # one column's pair of taps per source pair, set to cancel
        first, w0, w1 = int(table[column, 0]), float(table[column, 1]), float(table[column, 2])
        if w1 != 0 and first + 1 < in_w:
            grid[:, first + 1] = -grid[:, first] * w0 / w1
    grid = grid.float().to(DEVICE)
    ref = tvf.resize(grid[None], [rows, out_w], interpolation=tvf.InterpolationMode.BILINEAR)[0]
    magnitude = tvf.resize(grid.abs()[None], [rows, out_w], interpolation=tvf.InterpolationMode.BILINEAR)[0]
    flipped = 0
    for mode in ACC_MODES:
        ours = interp_logits_float(grid, (rows, in_w), (rows, out_w), mode)
        assert torch.all((ours - ref).abs() <= NEAR_EXACT_RELATIVE_BOUND * magnitude)
        flips = (ours > 0) != (ref > 0)
        assert torch.all(ref[flips].abs() <= NEAR_EXACT_RELATIVE_BOUND * magnitude[flips])
        if mode == exact:
            assert not flips.any()
        flipped += int(flips.sum())
    assert flipped > 0  # the bound is exercised, not vacuous


# ----------------------------------------------------------------------------- host helpers


# ----------------------------------------------------------------------------- end to end


def test_realistic_nano_outputs(stage):
    raw = synthetic_outputs(n_confident=6, seed=1)
    assert _check(stage, raw, [make_metadata((96, 128))]) == [6]


@pytest.mark.parametrize(
    "meta",
    [
        make_metadata((90, 160), mode="letterbox"),
        make_metadata((160, 90), mode="letterbox"),
        make_metadata((140, 120), mode="letterbox", static_crop=(20, 10, 100, 80)),
        make_metadata((100, 100), static_crop=(40, 30, 80, 90)),  # canvas larger than the frame
    ],
    ids=["letterbox-wide", "letterbox-tall", "letterbox+crop", "crop-beyond-frame"],
)
def test_geometries(stage, meta):
    raw = synthetic_outputs(n_confident=3, seed=2)
    _check(stage, raw, [meta], formats=("dense", "rle"))
    if meta.static_crop_offset.offset_x:
        # all-foreground masks: the canvas outside the static crop must stay empty
        _check(stage, _with_masks(raw, lambda h, w: torch.full((h, w), 3.0)), [meta], formats=("dense", "rle"))


@pytest.mark.parametrize("hw", [(20, 10), (10, 20), (5, 300)], ids=["20x10", "10x20", "5x300"])
def test_frames_smaller_than_mask_grid(stage, hw):
    mode = "letterbox" if hw == (10, 20) else "stretch"
    formats = ("dense", "rle")
    _check(stage, synthetic_outputs(n_confident=4, seed=3), [make_metadata(hw, mode=mode)], formats=formats)


def test_empty_and_full_masks(stage):
    raw = synthetic_outputs(n_confident=3, seed=4)
    meta = [make_metadata((40, 56))]
    _check(stage, _with_masks(raw, lambda h, w: torch.full((h, w), -3.0)), meta)
    _check(stage, _with_masks(raw, lambda h, w: torch.full((h, w), 2.0)), meta, formats=("dense", "rle"))
    # exact zeros stay background (strict > 0)
    _check(stage, _with_masks(raw, lambda h, w: torch.zeros((h, w))), meta, formats=("rle",))


def _lines(h, w):
    m = torch.full((h, w), -4.0)
    m[:, 5] = 3.0  # 1-pixel-wide column
    m[9, :] = 3.0  # 1-pixel-high row
    m[20, 30] = 3.0  # single pixel
    idx = torch.arange(40, 70)
    m[idx, idx] = 3.0  # diagonal
    m[0, :] = 1.0  # touching the borders
    m[:, -1] = 1.0
    return m


def test_one_pixel_structures_and_borders_at_grid_resolution(stage):
    # frame == network == mask grid size: the resize is the identity
    raw = _with_masks(synthetic_outputs(n_confident=2, seed=5), _lines)
    meta = [make_metadata((78, 78), inference_hw=(78, 78))]
    _check(stage, raw, meta)


def test_thin_upsampled_structures(stage):
    raw = _with_masks(synthetic_outputs(n_confident=2, seed=6), _lines)
    _check(stage, raw, [make_metadata((150, 130))], formats=("dense", "rle"))


def test_high_frequency_noise(stage):
    gen = torch.Generator().manual_seed(7)
    raw = synthetic_outputs(n_confident=2, seed=7)
    raw.masks = torch.randn(raw.masks.shape, generator=gen)
    _check(stage, raw, [make_metadata((100, 90))])


def test_half_precision_masks(stage):
    raw = synthetic_outputs(n_confident=3, seed=8)
    raw.masks = raw.masks.half()
    _check(stage, raw, [make_metadata((72, 88))], formats=("dense", "rle"))


def test_4k_frame(stage):
    raw = synthetic_outputs(n_confident=1, seed=10)
    _check(stage, raw, [make_metadata((2160, 3840))], formats=("rle", "dense"))


def test_one_pixel_wide_static_crop(stage):
    # a 1-pixel-wide static crop: the cropped mask grid is 1 column wide and only
    # stretched vertically; torch's CPU resize is wrong for that shape (it repeats the
    # first row), so the stage declines on CPU and must be exact on CUDA
    meta = [make_metadata((130, 9), inference_hw=(100, 100), mode="letterbox", static_crop=(5, 84, 1, 62))]
    raw = synthetic_outputs(n_confident=2, seed=13, mask_hw=(33, 33))
    raw.masks[..., 16] = torch.linspace(-3, 3, 33)
    req = PostprocessRequest(threshold=0.5, max_detections=None, mask_format="rle")
    if CUDA:
        _check(stage, raw, meta, formats=("dense", "rle"))
    else:
        assert "1-pixel-wide" in stage.unsupported_reason(meta, req, raw)
