"""Synthetic instance-segmentation scenes with exact ground truth, as stills or as moving clips.

Design. Each object is a class shape (a polygon in unit coordinates, bounding radius 1, aspect
jittered) plus a small texture patch in the same coordinates. A pose (centre, radius, angle) maps
both into the frame: the polygon is rasterised with ``cv2.fillPoly`` (sub-pixel vertices, no
anti-aliasing) into a boolean mask, and the patch is warped with ``cv2.warpAffine``. Objects are
composited back to front into a label map, so each visible mask is exactly the set of pixels the
object painted and visible masks never overlap. Colour and texture are random per object; only
the shape carries the class. Backgrounds (gradients, value noise, stripes/checker, colour noise,
public-domain/CC0 scikit-image photos, plus unlabelled lines and blobs) come from
:mod:`.scene_backgrounds`.

Small objects: an object whose visible area ends up below ``min_visible_pixels`` is removed and
the frame is composited again without it, so every painted object is labelled and no label is a
sliver. Removing an object only uncovers others, so one re-composite suffices.

Ground truth order is back to front (the last mask is on top). Images are RGB ``uint8``.

Usage::

    python -c "import numpy as np; from inference_fastpath.examples.training.synthetic_scenes import *; \\
s = render_scene(np.random.default_rng(0)); print(s.image.shape, [CLASS_NAMES[c] for c in s.classes])"
    python -m inference_fastpath.examples.training.synthetic_scenes   # prints render speed
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .scene_backgrounds import PATCH_SIZE, make_background, make_texture, noise_pair

__all__ = [
    "CLASS_NAMES",
    "GroundTruth",
    "Scene",
    "SceneConfig",
    "load_class_names",
    "load_ground_truth",
    "render_clip",
    "render_scene",
    "save_ground_truth",
]

CLASS_NAMES: Tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "cross")
GT_FORMAT_VERSION = 1
_SUBPIXEL_BITS = 4  # cv2.fillPoly `shift`: vertices carry 1/16 pixel precision, so motion is smooth


@dataclass(frozen=True)
class SceneConfig:
    """Scene geometry. Object size is the diameter of its bounding circle as a fraction of
    ``min(height, width)``, drawn log-uniformly from ``[min_scale, max_scale]``."""

    height: int = 312
    width: int = 312
    min_objects: int = 1
    max_objects: int = 8
    min_scale: float = 0.06
    max_scale: float = 0.35
    min_visible_pixels: int = 16
    photo_probability: float = 0.2  # share of backgrounds that are scikit-image photos

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = int if f.type in ("int", int) else float
            wrong_type = not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int))
            if isinstance(value, bool) or wrong_type:
                raise ValueError(f"SceneConfig.{f.name} must be a {kind.__name__}, got {value!r}")
        checks = (
            ("height", self.height >= 16, "must be >= 16"),
            ("width", self.width >= 16, "must be >= 16"),
            ("min_objects", self.min_objects >= 0, "must be >= 0"),
            ("max_objects", self.max_objects >= self.min_objects, "must be >= min_objects"),
            ("max_objects", self.max_objects <= 1000, "must be <= 1000"),
            ("min_scale", self.min_scale > 0, "must be > 0"),
            ("max_scale", self.max_scale >= self.min_scale, "must be >= min_scale"),
            ("max_scale", self.max_scale <= 2.0, "must be <= 2.0"),
            ("min_visible_pixels", self.min_visible_pixels >= 1, "must be >= 1"),
            ("photo_probability", 0.0 <= self.photo_probability <= 1.0, "must be in [0, 1]"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"SceneConfig.{name} {message}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Scene:
    """One rendered frame. ``track_ids`` are stable object identities within a clip (in a still,
    the index among the objects that were placed, so dropped objects leave gaps)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool, visible after occlusion, pairwise disjoint
    classes: np.ndarray  # (N,) int64 into CLASS_NAMES
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels, tight on the mask (x2 = max x + 1)
    track_ids: Optional[np.ndarray] = None  # (N,) int64


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth of one frame as read back by :func:`load_ground_truth` (no image)."""

    masks: np.ndarray  # (N, H, W) bool
    classes: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) float32
    track_ids: np.ndarray  # (N,) int64, -1 where the saved scene had none


# ---------------------------------------------------------------------------------------------
# Shapes and objects


def _circle(n: int = 48, radius: float = 1.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _shape(rng: np.random.Generator, class_id: int) -> List[np.ndarray]:
    """Unit-coordinate contours of one class instance; several contours fill even-odd (holes)."""
    name = CLASS_NAMES[class_id]
    if name == "disc":
        contours = [_circle()]
    elif name == "square":
        h = 1 / math.sqrt(2)
        contours = [np.array([[-h, -h], [h, -h], [h, h], [-h, h]])]
    elif name == "triangle":
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12, 12, 3))
        contours = [np.stack([np.cos(angles), np.sin(angles)], axis=1)]
    elif name == "star":
        points = int(rng.integers(5, 7))
        radii = np.tile([1.0, rng.uniform(0.4, 0.52)], points)
        t = np.arange(2 * points) * (math.pi / points)
        contours = [np.stack([np.cos(t), np.sin(t)], axis=1) * radii[:, None]]
    elif name == "ring":
        contours = [_circle(), _circle(radius=rng.uniform(0.48, 0.62))[::-1]]
    elif name == "cross":
        w = rng.uniform(0.24, 0.36)
        arm = math.sqrt(1 - w * w)
        quarter = np.array([[arm, -w], [arm, w], [w, w]])
        # One arm end plus the inner corner after it; four quarter turns trace the plus sign.
        rot = np.array([[0.0, -1.0], [1.0, 0.0]])
        contours = [np.concatenate([quarter @ np.linalg.matrix_power(rot, k).T for k in range(4)])]
    else:  # pragma: no cover - CLASS_NAMES and this table are edited together
        raise AssertionError(name)
    # Squash one axis: stays inside the unit circle, so `radius` remains the bounding radius.
    aspect = np.ones(2)
    aspect[int(rng.integers(2))] = rng.uniform(0.7, 1.0)
    return [c * aspect for c in contours]


@dataclass
class _Object:
    track_id: int
    class_id: int
    contours: List[np.ndarray]
    texture: np.ndarray  # (PATCH_SIZE, PATCH_SIZE, 3) uint8 over the unit square [-1, 1]^2
    outline: int  # outline thickness in pixels at radius 50 (0 = none)


@dataclass
class _Placed:
    """An object rasterised at one pose, cropped to where it touches the frame."""

    track_id: int
    class_id: int
    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool
    colour: np.ndarray  # (h, w, 3) uint8


def _new_object(rng: np.random.Generator, track_id: int, background_mean: np.ndarray) -> _Object:
    class_id = int(rng.integers(len(CLASS_NAMES)))
    outline = int(rng.integers(1, 4)) if rng.random() < 0.5 else 0
    return _Object(track_id, class_id, _shape(rng, class_id), make_texture(rng, background_mean), outline)


def _rasterise(
    obj: _Object, cx: float, cy: float, radius: float, angle: float, height: int, width: int
) -> Optional[_Placed]:
    c, s = math.cos(angle), math.sin(angle)
    linear = np.array([[c, -s], [s, c]]) * radius
    contours = [pts @ linear.T + (cx, cy) for pts in obj.contours]
    every = np.concatenate(contours)
    x0, y0 = max(0, int(math.floor(every[:, 0].min()))), max(0, int(math.floor(every[:, 1].min())))
    x1 = min(width, int(math.ceil(every[:, 0].max())) + 1)
    y1 = min(height, int(math.ceil(every[:, 1].max())) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    scale = 1 << _SUBPIXEL_BITS
    fixed = [np.round((p - (x0, y0)) * scale).astype(np.int32) for p in contours]
    cv2.fillPoly(mask, fixed, 1, cv2.LINE_8, _SUBPIXEL_BITS)
    if not mask.any():
        return None
    # Patch pixel p sits at unit coordinate (p - centre) / half; map it through the same pose.
    half, centre = PATCH_SIZE / 2, (PATCH_SIZE - 1) / 2
    affine = linear / half
    shift = np.array([cx - x0, cy - y0]) - affine @ (centre, centre)
    matrix = np.hstack([affine, shift[:, None]])
    colour = cv2.warpAffine(
        obj.texture, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    if obj.outline:
        thickness = max(1, round(obj.outline * radius / 50))
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=thickness)
        edge = (mask > inner)[:, :, None]
        np.copyto(colour, (colour // 2).astype(np.uint8), where=edge)
    return _Placed(obj.track_id, obj.class_id, y0, x0, mask.view(bool), colour)


# ---------------------------------------------------------------------------------------------
# Compositing


_Noise = Tuple[np.ndarray, np.ndarray]


def _compose(background: np.ndarray, placed: Sequence[_Placed], min_visible: int, noise: Optional[_Noise]) -> Scene:
    """Paint ``placed`` back to front over ``background``; objects left with fewer than
    ``min_visible`` visible pixels are dropped and not painted."""
    height, width = background.shape[:2]
    label = np.full((height, width), -1, np.int32)
    while True:
        label.fill(-1)
        for k, p in enumerate(placed):
            label[p.y0 : p.y0 + p.mask.shape[0], p.x0 : p.x0 + p.mask.shape[1]][p.mask] = k
        visible = [np.count_nonzero(_crop(label, p) == k) for k, p in enumerate(placed)]
        if all(v >= min_visible for v in visible):
            break
        placed = [p for p, v in zip(placed, visible) if v >= min_visible]
    image = background.copy()
    n = len(placed)
    masks = np.zeros((n, height, width), bool)
    boxes = np.zeros((n, 4), np.float32)
    for k, p in enumerate(placed):
        h, w = p.mask.shape
        np.copyto(image[p.y0 : p.y0 + h, p.x0 : p.x0 + w], p.colour, where=p.mask[:, :, None])
        local = _crop(label, p) == k
        masks[k, p.y0 : p.y0 + h, p.x0 : p.x0 + w] = local
        rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
        boxes[k] = (p.x0 + cols[0], p.y0 + rows[0], p.x0 + cols[-1] + 1, p.y0 + rows[-1] + 1)
    if noise is not None:
        image = cv2.subtract(cv2.add(image, noise[0]), noise[1])
    return Scene(
        image=image,
        masks=masks,
        classes=np.array([p.class_id for p in placed], np.int64),
        boxes=boxes,
        track_ids=np.array([p.track_id for p in placed], np.int64),
    )


def _crop(label: np.ndarray, p: _Placed) -> np.ndarray:
    return label[p.y0 : p.y0 + p.mask.shape[0], p.x0 : p.x0 + p.mask.shape[1]]


def _sample_radius(rng: np.random.Generator, config: SceneConfig) -> float:
    size = math.exp(rng.uniform(math.log(config.min_scale), math.log(config.max_scale)))
    return 0.5 * size * min(config.height, config.width)


def _plan_scene(rng: np.random.Generator, config: SceneConfig) -> Tuple[np.ndarray, List[_Placed], _Noise]:
    """Background, rasterised objects (back to front) and noise of one still; split out of
    :func:`render_scene` so tests can re-composite subsets of the same objects."""
    height, width = config.height, config.width
    background = make_background(rng, height, width, config.photo_probability)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: List[_Placed] = []
    for track_id in range(count):
        radius = _sample_radius(rng, config)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = max(1, int(radius))
        near = background[max(0, int(cy) - r) : int(cy) + r + 1, max(0, int(cx) - r) : int(cx) + r + 1]
        obj = _new_object(rng, track_id, np.array(cv2.mean(near)[:3]))
        p = _rasterise(obj, cx, cy, radius, rng.uniform(0, 2 * math.pi), height, width)
        if p is not None:
            placed.append(p)
    return background, placed, noise_pair(rng, height, width)


def render_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """Render one random still scene; identical ``rng`` state gives identical arrays."""
    background, placed, noise = _plan_scene(rng, config)
    return _compose(background, placed, config.min_visible_pixels, noise)


def render_clip(seed: int, frames: int, config: SceneConfig) -> Iterator[Scene]:
    """A moving scene of ``frames`` frames, fully determined by ``seed``.

    Objects keep track id, class, shape and texture; they drift at constant velocity and bounce
    when their centre reaches a frame edge (so up to half leaves the frame), spin, breathe in
    scale and occlude each other in a fixed z-order. The background is fixed or pans slowly with
    sub-pixel steps. Frames where an object is hidden or too small simply omit it.
    """
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 0:
        raise ValueError(f"frames must be a non-negative int, got {frames!r}")
    return _clip_frames(np.random.default_rng(seed), int(frames), config)


def _clip_frames(rng: np.random.Generator, frames: int, config: SceneConfig) -> Iterator[Scene]:
    height, width = config.height, config.width
    unit = min(height, width) / 312.0
    pad = int(0.08 * min(height, width)) + 2
    big = make_background(rng, height + 2 * pad, width + 2 * pad, config.photo_probability)
    pan = np.array([pad, pad], np.float64)
    pan_velocity = rng.uniform(-0.4, 0.4, 2) * unit if rng.random() < 0.5 else np.zeros(2)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    mean = np.array(cv2.mean(big)[:3])
    objects = [_new_object(rng, k, mean) for k in range(count)]
    position = rng.uniform((0, 0), (width, height), (count, 2))
    speed, heading = rng.uniform(0.3, 3.0, count) * unit, rng.uniform(0, 2 * math.pi, count)
    velocity = np.stack([np.cos(heading), np.sin(heading)], axis=1) * speed[:, None]
    radius0 = np.array([_sample_radius(rng, config) for _ in range(count)])
    breathe, period = rng.uniform(0.0, 0.25, count), rng.uniform(60, 240, count)
    phase = rng.uniform(0, 2 * math.pi, count)
    angle, spin = rng.uniform(0, 2 * math.pi, count), np.deg2rad(rng.uniform(-2.5, 2.5, count))
    noise_big = noise_pair(rng, height + 16, width + 16)
    for t in range(frames):
        centre = (float(pan[0]) + (width - 1) / 2, float(pan[1]) + (height - 1) / 2)
        if pan_velocity.any():
            view = cv2.getRectSubPix(big, (width, height), centre)
        else:
            view = big[pad : pad + height, pad : pad + width]
        radius = radius0 * np.exp(breathe * np.sin(2 * math.pi * t / period + phase))
        placed = [_rasterise(o, *position[k], radius[k], angle[k], height, width) for k, o in enumerate(objects)]
        ox, oy = int(rng.integers(17)), int(rng.integers(17))
        noise = tuple(n[oy : oy + height, ox : ox + width] for n in noise_big)
        yield _compose(view, [p for p in placed if p is not None], config.min_visible_pixels, noise)
        position += velocity
        for axis, limit in ((0, width), (1, height)):
            p, v = position[:, axis], velocity[:, axis]
            v[(p < 0) & (v < 0) | (p > limit) & (v > 0)] *= -1  # `v` is a view: bounces in place
        angle += spin
        pan += pan_velocity
        bounce = (pan < 0) & (pan_velocity < 0) | (pan > 2 * pad) & (pan_velocity > 0)
        pan_velocity = np.where(bounce, -pan_velocity, pan_velocity)


# ---------------------------------------------------------------------------------------------
# Ground-truth files


def save_ground_truth(
    path: Union[str, os.PathLike],
    scenes: Sequence[Union[Scene, GroundTruth]],
    class_names: Sequence[str] = CLASS_NAMES,
) -> None:
    """Write the ground truth of ``scenes`` (frame index = position in the sequence) to ``path``.

    Format: an ``np.savez_compressed`` archive (no pickles) with

    * ``format_version`` int64 scalar (1); ``class_names`` unicode (C,); ``image_size`` int64 (H, W);
    * ``object_counts`` int64 (F,): objects per frame; frame f owns rows
      ``sum(object_counts[:f])`` up to ``sum(object_counts[:f+1])`` of the per-object arrays:
    * ``classes`` int64 (M,), ``boxes`` float32 (M, 4) xyxy, ``track_ids`` int64 (M,) (-1 = none);
    * ``mask_crops`` int32 (M, 4): x0, y0, x1, y1 of the tight box of each mask (zeros if empty);
    * ``mask_bits`` uint8: for each object, ``np.packbits`` of its mask cropped to ``mask_crops``
      (row-major), concatenated; ``mask_offsets`` int64 (M + 1,) gives each object's byte span.
    """
    names = np.array(list(class_names), dtype=str)
    size = scenes[0].masks.shape[1:] if len(scenes) else (0, 0)
    counts, classes, boxes, tracks, crops, bits = [], [], [], [], [], []
    for index, scene in enumerate(scenes):
        masks = np.asarray(scene.masks)
        if masks.dtype != bool or masks.ndim != 3 or masks.shape[1:] != tuple(size):
            expected = f"bool (N, {size[0]}, {size[1]})"
            raise ValueError(f"scenes[{index}].masks must be {expected}, got {masks.dtype} {masks.shape}")
        cls = np.asarray(scene.classes, np.int64)
        if cls.shape != (len(masks),) or (cls.size and (cls.min() < 0 or cls.max() >= len(names))):
            raise ValueError(f"scenes[{index}].classes must be {len(masks)} ids in [0, {len(names)})")
        counts.append(len(masks))
        classes.append(cls)
        boxes.append(np.asarray(scene.boxes, np.float32).reshape(len(masks), 4))
        ids = scene.track_ids
        tracks.append(np.full(len(masks), -1, np.int64) if ids is None else np.asarray(ids, np.int64))
        for mask in masks:
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            crop = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) if rows.size else (0, 0, 0, 0)
            crops.append(crop)
            bits.append(np.packbits(mask[crop[1] : crop[3], crop[0] : crop[2]]))
    offsets = np.cumsum([0] + [b.size for b in bits], dtype=np.int64)
    with open(path, "wb") as handle:  # a file object stops numpy from appending ".npz"
        np.savez_compressed(
            handle,
            format_version=np.int64(GT_FORMAT_VERSION),
            class_names=names,
            image_size=np.array(size, np.int64),
            object_counts=np.array(counts, np.int64),
            classes=np.concatenate(classes) if classes else np.zeros(0, np.int64),
            boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
            track_ids=np.concatenate(tracks) if tracks else np.zeros(0, np.int64),
            mask_crops=np.array(crops, np.int32).reshape(-1, 4),
            mask_bits=np.concatenate(bits) if bits else np.zeros(0, np.uint8),
            mask_offsets=offsets,
        )


def load_ground_truth(path: Union[str, os.PathLike]) -> List[GroundTruth]:
    """Read a file written by :func:`save_ground_truth`; masks, classes and boxes are exact."""
    with np.load(path, allow_pickle=False) as data:
        if int(data["format_version"]) != GT_FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported ground-truth format_version {int(data['format_version'])}")
        height, width = (int(v) for v in data["image_size"])
        counts, classes, boxes = data["object_counts"], data["classes"], data["boxes"]
        tracks, crops, bits, offsets = data["track_ids"], data["mask_crops"], data["mask_bits"], data["mask_offsets"]
    frames: List[GroundTruth] = []
    start = 0
    for count in counts:
        stop = start + int(count)
        masks = np.zeros((stop - start, height, width), bool)
        for k, m in enumerate(range(start, stop)):
            x0, y0, x1, y1 = (int(v) for v in crops[m])
            shape = (y1 - y0, x1 - x0)
            packed = bits[offsets[m] : offsets[m + 1]]
            masks[k, y0:y1, x0:x1] = np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).view(bool)
        rows = slice(start, stop)
        frames.append(GroundTruth(masks, classes[rows].copy(), boxes[rows].copy(), tracks[rows].copy()))
        start = stop
    return frames


def load_class_names(path: Union[str, os.PathLike]) -> Tuple[str, ...]:
    """Class names stored in a ground-truth file."""
    with np.load(path, allow_pickle=False) as data:
        return tuple(str(n) for n in data["class_names"])


def _speed_check() -> None:
    import time

    rng = np.random.default_rng(0)
    render_scene(rng)  # loads the photo backgrounds once
    start, count = time.perf_counter(), 200
    for _ in range(count):
        render_scene(rng)
    print(f"render_scene 312x312: {(time.perf_counter() - start) / count * 1e3:.2f} ms/scene")
    start, count = time.perf_counter(), 150
    for _ in render_clip(0, count, SceneConfig(height=576, width=768)):
        pass
    print(f"render_clip 768x576: {count / (time.perf_counter() - start):.0f} frames/s")


if __name__ == "__main__":
    _speed_check()
