"""Host-side tables of the fused preprocess (``preprocess_resize_normalize.py``): Pillow's fixed-point
BILINEAR coefficients, OpenCV's INTER_LINEAR coefficients per axis, and the normalisation lookup table.
Computed on the host in the references' own arithmetic, so the kernels only look them up.

Example:
    >>> start, weights = pil_bilinear_axis(4, 2)  # halving: three taps per output pixel
    >>> start.tolist(), weights[:, 0].tolist(), int(weights[:, 0].sum()) == 1 << PRECISION_BITS
    ([0, 1], [1797559, 1797559, 599186], True)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2
_CV_COEF_SCALE = 2048  # OpenCV INTER_RESIZE_COEF_SCALE (11 bits)


def _triangle(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _to_fixed_point(weight: float) -> int:
    # Pillow rounds half away from zero, then truncates (C cast).
    scaled = weight * (1 << PRECISION_BITS)
    return int(scaled - 0.5) if weight < 0 else int(scaled + 0.5)


def pil_bilinear_axis(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point BILINEAR coefficients for one axis.

    Returns ``(start, weights)``: ``start[o]`` is the first source index of output ``o`` and
    ``weights[k, o]`` the int32 weight of source ``start[o] + k`` (zero past the window). The
    number of rows of ``weights`` is the longest window, not Pillow's padded ``ksize``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = float(in_size) / out_size  # (double)(in1 - in0) / outSize with in0 = 0
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    inv_filterscale = 1.0 / filterscale
    starts, windows = [], []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates like the C cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [_triangle((x + xmin - center + 0.5) * inv_filterscale) for x in range(xmax)]
        total = 0.0
        for w in taps:  # sequential sum, same order as Pillow
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        starts.append(xmin)
        windows.append([_to_fixed_point(w) for w in taps])
    n_taps = max(1, max(len(w) for w in windows))
    weights = np.zeros((n_taps, out_size), dtype=np.int32)
    for o, window in enumerate(windows):
        weights[: len(window), o] = window
    return np.asarray(starts, dtype=np.int32), weights


def pillow_resizes_vertically_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pass order of ``Image.resize`` (Pillow >= 12.2): images taller than 100x their width that
    shrink vertically are resized vertically first (two ``im.resize`` calls)."""
    return _PILLOW_HAS_TALL_RULE and in_h > in_w * 100 and out_h < in_h


def _pillow_has_tall_rule() -> bool:
    try:
        import PIL

        major, minor = (int(p) for p in PIL.__version__.split(".")[:2])
    except Exception:  # pragma: no cover - Pillow missing or odd version string
        return True
    return (major, minor) >= (12, 2)


_PILLOW_HAS_TALL_RULE = _pillow_has_tall_rule()  # constant, read once


def cv2_linear_axis(in_size: int, out_size: int, clamp_fraction: bool) -> np.ndarray:
    """OpenCV INTER_LINEAR (uint8) coefficients for one axis as int32 ``[4, out]`` rows:
    first index, second index, first weight, second weight (weights sum to 2048).

    The source position is computed in double and rounded to float32, the fraction in float32
    and the weights rounded half-to-even, like ``cv::resize``. Horizontally (``clamp_fraction``)
    OpenCV replicates the border pixel outside the image (weight 2048 on the clamped index);
    vertically it clamps the row indices but keeps the fraction.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = 1.0 / (out_size / in_size)
    pos = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp_fraction:
        outside = (first < 0) | (first >= in_size - 1)
        frac = np.where(outside, np.float32(0.0), frac)
    idx0 = np.clip(first, 0, in_size - 1)
    idx1 = np.clip(first + 1, 0, in_size - 1)
    one = np.float32(1.0)
    w0 = np.rint((one - frac) * np.float32(_CV_COEF_SCALE))
    w1 = np.rint(frac * np.float32(_CV_COEF_SCALE))
    return np.stack([idx0, idx1, w0, w1]).astype(np.int32)


def normalization_lut(
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    divisor: float = 255.0,
    multiplier: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[3, 256]`` table: ``((v / divisor) - mean[c]) / std[c]`` (then ``* multiplier``)
    evaluated with torch float32 CPU ops, i.e. with the reference's rounding at every step,
    then rounded once to ``dtype`` (as ``reference.to(dtype)`` would)."""
    values = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(divisor)
    lut = values.expand(3, 256).clone()
    if mean is not None and std is not None:
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1)
        lut = lut.sub(mean_t).div(std_t)
    if multiplier is not None:
        lut = lut * multiplier
    return lut.to(dtype).contiguous()


__all__ = ["PRECISION_BITS", "cv2_linear_axis", "normalization_lut", "pil_bilinear_axis",
           "pillow_resizes_vertically_first"]
