"""Device COCO string coder vs pycocotools' own coder, over canvases and mask shapes.

Runs on CUDA when available, else through the Triton interpreter (CPU).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from inference_fastpath.kernels.postprocess_rle_string import launch_rle_strings

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _transitions(mask: np.ndarray) -> np.ndarray:
    flat = mask.T.reshape(-1)  # column-major, as COCO
    return np.flatnonzero(flat != np.concatenate([[False], flat[:-1]])).astype(np.int32)


def _run(rows, out_bytes=None):
    """rows: (transitions or None for a row without a mask, height, width).
    Returns (strings per row, lengths per row) from the device coder."""
    starts, slots, pixels, pieces, cursor = [], [], [], [], 0
    for transitions, height, width in rows:
        starts.append(cursor)
        pixels.append(height * width)
        if transitions is None:
            slots.append(0)
            continue
        slots.append(transitions.size + 1)
        pieces.append(transitions)
        cursor += transitions.size
    positions = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    out = torch.full((out_bytes if out_bytes is not None else 8 * (cursor + len(rows)),), 255, dtype=torch.uint8,
                     device=DEVICE)
    row_bytes = torch.empty(len(rows), dtype=torch.int64, device=DEVICE)
    offsets = launch_rle_strings(
        torch.from_numpy(np.append(positions, np.int32(0))).to(DEVICE),  # never an empty buffer
        torch.tensor(starts, dtype=torch.int64, device=DEVICE),
        torch.tensor(slots, dtype=torch.int32, device=DEVICE),
        torch.tensor(pixels, dtype=torch.int64, device=DEVICE),
        out,
        row_bytes,
    )
    host, lengths = out.cpu().numpy(), row_bytes.cpu().tolist()
    strings = [host[o : o + n].tobytes() for o, n in zip(offsets.cpu().tolist(), lengths)]
    return strings, lengths, host


@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (7, 1), (3, 5), (97, 131), (480, 640), (2160, 3840)])
def test_strings_equal_pycocotools(hw):
    """Empty, full, foreground at the first / last pixel, a rectangle, noise (many short
    runs, negative count differences; long runs after it at 4K), in one launch with rows that
    hold no mask."""
    h, w = hw
    rng = np.random.default_rng(h * 7 + w)
    masks = [np.zeros(hw, bool) for _ in range(6)]
    masks[1][:] = True
    masks[2][0, 0] = True
    masks[3][-1, -1] = True
    masks[4][h // 3 : h // 2 + 1, w // 4 : w // 2 + 1] = True
    window = (min(h, 256), min(w, 256))  # noise in a corner: the interpreter pays per run
    masks[5][: window[0], : window[1]] = rng.random(window) < 0.5
    rows = [(_transitions(m), h, w) for m in masks]
    rows.insert(2, (None, h, w))
    rows.append((None, h, w))
    strings, lengths, _ = _run(rows)
    assert lengths[2] == 0 and lengths[-1] == 0
    got = [s for s, row in zip(strings, rows) if row[0] is not None]
    for string, mask in zip(got, masks):
        assert string == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


@pytest.mark.parametrize("n_pixels", [2**20, 2**26, 2**31 - 1])
def test_large_counts_take_more_groups(n_pixels):
    """Run lengths and differences beyond 2**24 (6 and 7 groups), checked on the counts
    themselves (no mask that large is materialised)."""
    rng = np.random.default_rng(n_pixels % 1000)
    transitions = np.sort(rng.choice(n_pixels, size=9, replace=False)).astype(np.int32)
    transitions[0] = 3
    height, width = 1, n_pixels
    (string,), _, _ = _run([(transitions, height, width)])
    counts = np.diff(np.concatenate([[0], transitions.astype(np.int64), [n_pixels]])).astype(np.uint32)
    expected = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)["counts"]
    assert string == expected


def test_mixed_canvas_sizes_in_one_launch():
    rng = np.random.default_rng(3)
    rows = []
    for hw in [(5, 7), (312, 312), (1, 1), (64, 33)]:
        mask = rng.random(hw) < 0.3
        rows.append((_transitions(mask), *hw))
    strings, _, _ = _run(rows)
    for string, (transitions, h, w) in zip(strings, rows):
        mask = np.zeros(h * w, bool)
        for a, b in zip(transitions[0::2], np.append(transitions[1::2], h * w)):
            mask[a:b] = True
        assert string == mask_utils.encode(np.asfortranarray(mask.reshape(w, h).T.astype(np.uint8)))["counts"]


def test_output_limit_keeps_exact_lengths():
    """Nothing is written past the buffer; the lengths still tell the caller how much room
    the strings need."""
    rng = np.random.default_rng(5)
    mask = rng.random((40, 50)) < 0.5
    rows = [(_transitions(mask), 40, 50)] * 2
    full, full_lengths, _ = _run(rows)
    limit = full_lengths[0] + 3
    _, lengths, host = _run(rows, out_bytes=limit + 16)
    assert lengths == full_lengths
    _, lengths, host = _run(rows, out_bytes=limit)
    assert lengths == full_lengths
    assert host[: full_lengths[0]].tobytes() == full[0]
    assert host[full_lengths[0] : limit].tobytes() == full[1][:3]
