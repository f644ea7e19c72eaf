"""Generate the demo clips: ``examples/data/clip.mp4`` from scikit-image's bundled sample images, and
``examples/data/shapes_clip.mp4`` (with its exact ground truth) from the synthetic scene generator.

The clip is a slow Ken Burns pan/zoom over a few public-domain / CC0 photographs that ship inside
the scikit-image wheel (no network access needed), with hard cuts between scenes, so consecutive
frames differ the way real video does. Output is fully deterministic for a given OpenCV build.

    python -m inference_fastpath.examples.make_clip --out examples/data/clip.mp4 --frames 120
    python -m inference_fastpath.examples.make_clip --source shapes --out examples/data/shapes_clip.mp4

The shapes clip is a few shots of moving procedural objects (the classes the demo network is trained
on, ``examples/training/synthetic_scenes.py``), with hard cuts between shots; its instance masks,
classes and boxes per frame go to ``<out stem>_ground_truth.npz`` (``load_ground_truth`` reads it).
The masks are exact for the rendered frames; the video's lossy codec changes pixel values, not
which object a pixel shows.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np

LOGGER = logging.getLogger(__name__)

DEFAULT_SIZE: Tuple[int, int] = (768, 576)  # (width, height)
DEFAULT_FRAMES = 120
DEFAULT_FPS = 25.0


def default_clip_path() -> Path:
    """Location of the committed demo clip."""
    return Path(__file__).resolve().parent / "data" / "clip.mp4"


def default_shapes_clip_path() -> Path:
    """Location of the committed shapes clip (``--source shapes``)."""
    return default_clip_path().with_name("shapes_clip.mp4")


@dataclass(frozen=True)
class Scene:
    """One shot of the clip: a pan/zoom from ``start`` to ``end`` over one sample image.

    ``start`` / ``end`` are (centre_x, centre_y, zoom) with the centre as a fraction of the source
    image and zoom = how many times smaller the viewed window is than the largest 4:3 window that
    fits the source (1.0 = whole frame, 1.6 = tighter crop).
    """

    image: str  # name of the skimage.data loader
    start: Tuple[float, float, float]
    end: Tuple[float, float, float]


# Only images whose skimage docstring states public domain or CC0 (see LICENSE-clip.md).
SCENES: Sequence[Scene] = (
    Scene("astronaut", start=(0.50, 0.45, 1.05), end=(0.46, 0.38, 1.35)),
    Scene("coffee", start=(0.46, 0.53, 1.30), end=(0.53, 0.48, 1.08)),
    Scene("chelsea", start=(0.42, 0.50, 1.10), end=(0.52, 0.45, 1.35)),
    Scene("rocket", start=(0.55, 0.56, 1.40), end=(0.50, 0.47, 1.15)),
)


def load_sample_image(name: str) -> np.ndarray:
    """Load a bundled skimage sample image as a 3-channel BGR uint8 array (no network)."""
    import skimage.data

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    rgb = np.asarray(loader())
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name} is {rgb.dtype}, expected uint8")
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)


def _ease(t: float) -> float:
    # Half linear, half smoothstep: the camera never stops (consecutive frames always differ)
    # but still slows down a little towards the cuts.
    return 0.5 * t + 0.5 * t * t * (3.0 - 2.0 * t)


def render_view(
    image: np.ndarray, centre: Tuple[float, float], zoom: float, size: Tuple[int, int]
) -> np.ndarray:
    """Render the 4:3 window of ``image`` at ``centre`` / ``zoom`` into an ``size`` (w, h) frame.

    Uses a sub-pixel affine warp rather than integer crops so slow motion does not judder.
    """
    out_w, out_h = size
    src_h, src_w = image.shape[:2]
    aspect = out_w / out_h
    full_w = min(src_w, src_h * aspect)  # largest window with the output aspect ratio
    win_w = full_w / zoom
    win_h = win_w / aspect
    # Keep the window inside the image so no border padding shows.
    cx = min(max(centre[0] * src_w, win_w / 2), src_w - win_w / 2)
    cy = min(max(centre[1] * src_h, win_h / 2), src_h - win_h / 2)
    scale = win_w / out_w  # source pixels per output pixel
    # Map output pixel centres to source coordinates (inverse map).
    matrix = np.array(
        [
            [scale, 0.0, cx - win_w / 2 + 0.5 * scale - 0.5],
            [0.0, scale, cy - win_h / 2 + 0.5 * scale - 0.5],
        ],
        dtype=np.float64,
    )
    return cv2.warpAffine(
        image,
        matrix,
        (out_w, out_h),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def generate_frames(
    num_frames: int = DEFAULT_FRAMES,
    size: Tuple[int, int] = DEFAULT_SIZE,
    scenes: Sequence[Scene] = SCENES,
) -> List[np.ndarray]:
    """Render all frames (BGR uint8, ``size`` = (w, h)) of the clip, scenes split evenly."""
    if num_frames < len(scenes):
        raise ValueError(f"need at least {len(scenes)} frames, got {num_frames}")
    images = {scene.image: load_sample_image(scene.image) for scene in scenes}
    bounds = [round(i * num_frames / len(scenes)) for i in range(len(scenes) + 1)]
    frames: List[np.ndarray] = []
    for scene, first, last in zip(scenes, bounds[:-1], bounds[1:]):
        length = last - first
        for i in range(length):
            t = _ease(i / max(length - 1, 1))
            cx = scene.start[0] + (scene.end[0] - scene.start[0]) * t
            cy = scene.start[1] + (scene.end[1] - scene.start[1]) * t
            # Interpolate zoom geometrically so the zoom speed looks constant.
            zoom = math.exp(
                math.log(scene.start[2]) + (math.log(scene.end[2]) - math.log(scene.start[2])) * t
            )
            frames.append(render_view(images[scene.image], (cx, cy), zoom, size))
    return frames


def write_clip(
    out: Path,
    num_frames: int = DEFAULT_FRAMES,
    size: Tuple[int, int] = DEFAULT_SIZE,
    fps: float = DEFAULT_FPS,
) -> Path:
    """Render the clip and write it with OpenCV's ``mp4v`` codec (readable by any OpenCV build)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = generate_frames(num_frames=num_frames, size=size)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {out} with codec mp4v")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    LOGGER.info(
        "wrote %s: %d frames %dx%d @ %.1f fps, %.2f MB",
        out,
        len(frames),
        size[0],
        size[1],
        fps,
        out.stat().st_size / 1e6,
    )
    return out


def shapes_ground_truth_path(clip: Path) -> Path:
    """Where ``write_shapes_clip`` puts the ground truth of ``clip``."""
    return Path(clip).with_name(Path(clip).stem + "_ground_truth.npz")


def write_shapes_clip(
    out: Path,
    num_frames: int = DEFAULT_FRAMES,
    size: Tuple[int, int] = DEFAULT_SIZE,
    fps: float = DEFAULT_FPS,
    seed: int = 0,
    shots: int = 4,
) -> Path:
    """Render ``shots`` synthetic shots (seeded) into ``out`` (``mp4v``) and their ground truth beside it."""
    from inference_fastpath.examples.training.synthetic_scenes import SceneConfig, render_clip, save_ground_truth

    if shots < 1 or num_frames < shots:
        raise ValueError(f"need at least one frame per shot, got {num_frames} frames for {shots} shots")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = SceneConfig(height=size[1], width=size[0], min_objects=3, max_objects=8)
    lengths = [num_frames // shots + (1 if k < num_frames % shots else 0) for k in range(shots)]
    scenes = [scene for k, length in enumerate(lengths) for scene in render_clip(seed * 1000 + k, length, config)]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {out} with codec mp4v")
    try:
        for scene in scenes:
            writer.write(cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    save_ground_truth(shapes_ground_truth_path(out), scenes)
    LOGGER.info("wrote %s and its ground truth: %d frames in %d shots, %d objects in all", out, len(scenes), shots,
                sum(len(s.classes) for s in scenes))
    return out


def _parse_size(text: str) -> Tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"size must look like 768x576, got {text!r}") from error
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError("width and height must be positive and even")
    return w, h


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_clip_path(), help="output .mp4 path")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="number of frames")
    parser.add_argument(
        "--size", type=_parse_size, default=DEFAULT_SIZE, help="WIDTHxHEIGHT, default 768x576"
    )
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frame rate")
    parser.add_argument("--source", choices=("photos", "shapes"), default="photos",
                        help="photos: pan/zoom over sample photos; shapes: synthetic objects with ground truth")
    parser.add_argument("--seed", type=int, default=0, help="shapes: seed of the shots")
    parser.add_argument("--shots", type=int, default=4, help="shapes: number of shots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source == "shapes":
        out = args.out if args.out != default_clip_path() else default_shapes_clip_path()
        path = write_shapes_clip(out, num_frames=args.frames, size=args.size, fps=args.fps, seed=args.seed,
                                 shots=args.shots)
    else:
        path = write_clip(args.out, num_frames=args.frames, size=args.size, fps=args.fps)
    print(path)


if __name__ == "__main__":
    main()
