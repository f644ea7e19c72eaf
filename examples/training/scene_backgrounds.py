"""Procedural backgrounds, object textures and sensor noise for :mod:`synthetic_scenes`.

Everything here is drawn from a caller-supplied ``numpy.random.Generator``, so a seed fixes the
output. Colour images are RGB ``uint8``. Continuous fields (ramps, value noise, stripes) are turned
into colour through a 256-entry palette lookup, which keeps the per-pixel work to one table read.

Photo backgrounds use only sample images that ship inside the scikit-image wheel and whose
scikit-image docstrings state a public-domain or CC0 status:

* ``brick``, ``grass``, ``gravel``: textures released under CC0 (grayscale; tinted here);
* ``chelsea``: photo of a cat, CC0 by the photographer (Stefan van der Walt);
* ``rocket``: SpaceX launch photo released into the public domain by SpaceX.

``coffee`` (CC0) and ``hubble_deep_field`` are left out on purpose: a cup seen from above and
round galaxies look like unlabelled discs and rings. If scikit-image or an image is missing, photo
backgrounds fall back to procedural ones, so output is only identical across machines that have
the same set of images.
"""

from __future__ import annotations

import colorsys
import functools
import math
from typing import Tuple

import cv2
import numpy as np

PHOTO_NAMES: Tuple[str, ...] = ("brick", "grass", "gravel", "chelsea", "rocket")
PATCH_SIZE = 64  # object textures live in a PATCH_SIZE square that is warped onto the object


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour; a fifth are near-grey so saturation is no shortcut either."""
    saturation = rng.uniform(0.0, 0.15) if rng.random() < 0.2 else rng.uniform(0.3, 1.0)
    rgb = colorsys.hsv_to_rgb(rng.random(), saturation, rng.uniform(0.15, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _palette(rng: np.random.Generator, stops: int) -> np.ndarray:
    """(256, 3) uint8 colour ramp through ``stops`` random colours."""
    colours = np.stack([random_colour(rng) for _ in range(stops)])
    positions = np.linspace(0.0, 1.0, stops)
    ramp = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(ramp, positions, colours[:, c]) for c in range(3)], axis=1)
    return table.astype(np.uint8)


def _apply_palette(palette: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Colour a float field in [0, 1] through a (256, 3) palette (one table read per pixel)."""
    index = cv2.convertScaleAbs(field, alpha=255.0)  # scales, rounds and saturates to uint8
    return cv2.LUT(cv2.merge([index, index, index]), palette.reshape(256, 1, 3))


def _coords(height: int, width: int, angle: float) -> np.ndarray:
    """Position along direction ``angle`` for every pixel, built by broadcasting (no meshgrid)."""
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
    return xs + ys


def _ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Linear ramp in [0, 1] along a random direction."""
    field = _coords(height, width, rng.uniform(0, 2 * math.pi))
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def value_noise(rng: np.random.Generator, height: int, width: int, cells: int, octaves: int) -> np.ndarray:
    """Smooth fractal value noise in [0, 1]: coarse random grids upsampled with cubic interpolation.

    Octaves are summed at a quarter of the size and upsampled once; the finest octave has cells
    several pixels wide, so nothing is lost that linear upsampling would need to invent.
    """
    work = (max(16, min(width, width // 4)), max(16, min(height, height // 4)))
    total = np.zeros((work[1], work[0]), np.float32)
    weight = np.float32(1.0)
    for octave in range(octaves):
        n = cells * 2**octave
        grid = rng.random((n + 1, n + 1), dtype=np.float32)
        total += weight * cv2.resize(grid, work, interpolation=cv2.INTER_CUBIC)
        weight *= np.float32(0.5)
    total -= total.min()
    total /= max(float(total.max()), 1e-6)
    if work == (width, height):
        return total
    return cv2.resize(total, (width, height), interpolation=cv2.INTER_LINEAR)


def _stripes(rng: np.random.Generator, height: int, width: int, period: float, checker: bool) -> np.ndarray:
    angle = rng.uniform(0, math.pi)
    # Parity of the stripe index; the checkerboard XORs in the perpendicular direction.
    frequency = np.float32(2 / period)
    band = np.floor(_coords(height, width, angle) * frequency).astype(np.int32)
    if checker:
        band += np.floor(_coords(height, width, angle + math.pi / 2) * frequency).astype(np.int32)
    return (band & 1).astype(np.float32)


def _photo_names_available() -> Tuple[str, ...]:
    return tuple(name for name in PHOTO_NAMES if _load_photo(name) is not None)


@functools.lru_cache(maxsize=None)
def _load_photo(name: str) -> "np.ndarray | None":
    try:
        import skimage.data

        image = np.asarray(getattr(skimage.data, name)())
    except Exception:  # missing package, image or fetcher: use procedural backgrounds instead
        return None
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


def _photo(rng: np.random.Generator, height: int, width: int) -> "np.ndarray | None":
    names = _photo_names_available()
    if not names:
        return None
    source = _load_photo(names[int(rng.integers(len(names)))])
    assert source is not None
    src_h, src_w = source.shape[:2]
    # Random crop with the target aspect ratio, then colour jitter so a photo is not one fixed look.
    crop = rng.uniform(0.5, 1.0) * min(src_w / width, src_h / height)
    cw, ch = max(int(width * crop), 8), max(int(height * crop), 8)
    x0, y0 = int(rng.integers(0, src_w - cw + 1)), int(rng.integers(0, src_h - ch + 1))
    image = cv2.resize(source[y0 : y0 + ch, x0 : x0 + cw], (width, height), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    tint = random_colour(rng) / 255.0 * 0.6 + 0.4 if rng.random() < 0.6 else np.ones(3, np.float32)
    # One saturating per-pixel affine colour transform: gain per channel plus a brightness offset.
    matrix = np.hstack([np.diag(tint * rng.uniform(0.6, 1.2)), np.full((3, 1), rng.uniform(-30, 30))])
    return cv2.transform(np.ascontiguousarray(image), matrix.astype(np.float32))


def _add_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    """Unlabelled distractors that are none of the object classes: thin lines and soft blobs."""
    height, width = image.shape[:2]
    scale = min(height, width)
    for _ in range(int(rng.integers(1, 7))):
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        thickness = int(rng.integers(1, max(2, scale // 120) + 1))
        cv2.line(image, p0, p1, random_colour(rng).tolist(), thickness)
    # Blobs are drawn and blurred at quarter resolution: a wide blur is costly at full size, and
    # its lack of any hard edge is what tells a blob apart from a drawn disc.
    small = (max(1, width // 4), max(1, height // 4))
    blobs = np.zeros((small[1], small[0], 3), np.float32)
    weight = np.zeros((small[1], small[0]), np.float32)
    for _ in range(int(rng.integers(0, 4))):
        centre = (int(rng.integers(small[0])), int(rng.integers(small[1])))
        radius = int(rng.uniform(0.0075, 0.03) * scale) + 1
        cv2.circle(blobs, centre, radius, random_colour(rng).tolist(), -1)
        cv2.circle(weight, centre, radius, 1.0, -1)
    if weight.any():
        sigma = 0.01 * scale
        weight = cv2.resize(cv2.GaussianBlur(weight, (0, 0), sigma), (width, height)) * np.float32(0.7)
        blobs = cv2.resize(cv2.GaussianBlur(blobs, (0, 0), sigma), (width, height)).astype(np.uint8)
        image[:] = cv2.blendLinear(image, blobs, 1 - weight, weight)


def make_background(rng: np.random.Generator, height: int, width: int, photo_probability: float) -> np.ndarray:
    """A (height, width, 3) uint8 RGB background of a randomly chosen kind."""
    image = _photo(rng, height, width) if rng.random() < photo_probability else None
    if image is None:
        kind = int(rng.integers(4))
        scale = min(height, width)
        if kind == 0:  # gradient, sometimes with a faint noise overlay
            field = _ramp(rng, height, width)
            field = field * 0.8 + 0.2 * value_noise(rng, height, width, 3, 2)
            image = _apply_palette(_palette(rng, int(rng.integers(2, 4))), field)
        elif kind == 1:  # smoothed value noise through a multi-colour palette
            field = value_noise(rng, height, width, int(rng.integers(2, 7)), int(rng.integers(1, 5)))
            image = _apply_palette(_palette(rng, int(rng.integers(2, 5))), field)
        elif kind == 2:  # stripes or checkerboard, softened and modulated
            period = rng.uniform(0.03, 0.2) * scale
            field = _stripes(rng, height, width, period, checker=rng.random() < 0.5)
            field = cv2.GaussianBlur(field, (0, 0), rng.uniform(0.3, 2.0))
            field = field * 0.7 + 0.3 * value_noise(rng, height, width, 2, 2)
            image = _apply_palette(_palette(rng, 2), field)
        else:  # blurred colour noise
            cells = int(rng.integers(4, 25))
            grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            # Blur at a quarter of the size, then upsample: same look, a fraction of the cost.
            small = cv2.resize(grid, (max(1, width // 4), max(1, height // 4)), interpolation=cv2.INTER_CUBIC)
            small = cv2.GaussianBlur(small, (0, 0), scale / cells * 0.125)
            image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image = np.ascontiguousarray(image)
    if rng.random() < 0.6:
        _add_clutter(rng, image)
    return image


def make_texture(rng: np.random.Generator, avoid_mean: np.ndarray) -> np.ndarray:
    """A (PATCH_SIZE, PATCH_SIZE, 3) uint8 object texture whose mean colour stands off ``avoid_mean``.

    The fill is solid + grain, stripes, gradient or blotches, with a lighting ramp on top. Colours
    are random per object; the only thing tied to the class is the shape.
    """
    size = PATCH_SIZE
    kind = int(rng.integers(4))
    if kind == 0:
        field = np.full((size, size), 0.5, np.float32)
    elif kind == 1:
        stripes = _stripes(rng, size, size, rng.uniform(8, 26), checker=rng.random() < 0.3)
        field = cv2.GaussianBlur(stripes, (0, 0), 0.6)
    elif kind == 2:
        field = _ramp(rng, size, size)
    else:
        field = value_noise(rng, size, size, int(rng.integers(2, 5)), 2)
    palette = _palette(rng, 2 if kind else 1)
    patch = _apply_palette(palette, field).astype(np.float32)
    patch *= _ramp(rng, size, size)[:, :, None] * rng.uniform(0.0, 0.5) + rng.uniform(0.7, 1.0)
    patch += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(rng.uniform(0.0, 12.0))
    # Too little contrast with the surroundings makes an object unlearnable; push brightness away.
    gap = float(np.abs(np.array(cv2.mean(patch)[:3]) - avoid_mean).mean())
    if gap < 40.0:
        patch += (40.0 - gap) * 1.5 * (1.0 if float(avoid_mean.mean()) < 128 else -1.0)
    return np.clip(patch, 0, 255).astype(np.uint8)


def noise_pair(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Two uint8 fields; adding the first and subtracting the second (saturating) is sensor grain."""
    # Random bytes masked to 2**k - 1 are far cheaper than bounded integer draws.
    mask = np.uint8((0, 1, 3, 7)[int(rng.integers(4))])
    size = height * width * 3
    fields = np.frombuffer(rng.bytes(2 * size), np.uint8) & mask
    return fields[:size].reshape(height, width, 3), fields[size:].reshape(height, width, 3)
