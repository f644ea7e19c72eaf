"""Synthetic scene generator: exact, disjoint, tight ground truth; determinism; clips; GT files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inference_fastpath.examples.training import synthetic_scenes as ss
from inference_fastpath.examples.training.synthetic_scenes import (
    CLASS_NAMES,
    SceneConfig,
    load_class_names,
    load_ground_truth,
    render_clip,
    render_scene,
    save_ground_truth,
)

SMALL = SceneConfig(height=96, width=128, min_objects=2, max_objects=8, min_scale=0.1, max_scale=0.5)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _assert_same(a, b) -> None:
    for name in ("masks", "classes", "boxes", "track_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_shapes_and_dtypes():
    scene = render_scene(np.random.default_rng(0), SMALL)
    n = len(scene.classes)
    assert scene.image.shape == (96, 128, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == (n, 96, 128) and scene.masks.dtype == bool
    assert scene.classes.shape == (n,) and scene.classes.dtype == np.int64
    assert scene.boxes.shape == (n, 4) and scene.boxes.dtype == np.float32
    assert scene.track_ids.shape == (n,) and scene.track_ids.dtype == np.int64
    default = render_scene(np.random.default_rng(0))
    assert default.image.shape == (312, 312, 3)


def test_deterministic_from_seed():
    a = render_scene(np.random.default_rng(123), SMALL)
    b = render_scene(np.random.default_rng(123), SMALL)
    c = render_scene(np.random.default_rng(124), SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    _assert_same(a, b)
    assert not np.array_equal(a.image, c.image)
    clip_a = list(render_clip(5, 4, SMALL))
    clip_b = list(render_clip(5, 4, SMALL))
    for fa, fb in zip(clip_a, clip_b):
        np.testing.assert_array_equal(fa.image, fb.image)
        _assert_same(fa, fb)


@pytest.mark.parametrize("config", [SMALL, SceneConfig(min_visible_pixels=200, max_objects=12)])
def test_masks_disjoint_large_enough_and_boxes_tight(config):
    rng = np.random.default_rng(7)
    for _ in range(25):
        scene = render_scene(rng, config)
        assert scene.masks.sum(axis=0).max(initial=0) <= 1, "visible masks overlap"
        for mask, box in zip(scene.masks, scene.boxes):
            assert mask.sum() >= config.min_visible_pixels
            np.testing.assert_array_equal(box, _tight_box(mask))


def test_ground_truth_matches_painted_pixels_and_occlusion_happens():
    """Re-composite the same objects alone: every labelled pixel shows its own object, everything
    unlabelled is untouched background, and some back object loses pixels to one in front."""
    config = dataclasses.replace(SMALL, min_visible_pixels=1)
    occluded = 0
    for seed in range(40):
        background, placed, noise = ss._plan_scene(np.random.default_rng(seed), config)
        scene = ss._compose(background, placed, 1, noise)
        assert len(scene.classes) <= len(placed)
        empty = ss._compose(background, [], 1, noise)
        unlabelled = ~scene.masks.any(axis=0)
        np.testing.assert_array_equal(scene.image[unlabelled], empty.image[unlabelled])
        by_id = {p.track_id: p for p in placed}
        for k, track in enumerate(scene.track_ids):
            alone = ss._compose(background, [by_id[int(track)]], 1, noise)
            assert alone.classes[0] == scene.classes[k]
            visible = scene.masks[k]
            assert not (visible & ~alone.masks[0]).any(), "visible mask outside the object's own shape"
            np.testing.assert_array_equal(scene.image[visible], alone.image[visible])
            occluded += int(visible.sum() < alone.masks[0].sum())
        if len(scene.classes):  # nothing is in front of the top object
            top = ss._compose(background, [by_id[int(scene.track_ids[-1])]], 1, noise)
            np.testing.assert_array_equal(scene.masks[-1], top.masks[0])
    assert occluded >= 5


def test_small_objects_are_erased_not_left_unlabelled():
    config = dataclasses.replace(SMALL, min_visible_pixels=300, max_objects=10)
    dropped = 0
    for seed in range(30):
        background, placed, noise = ss._plan_scene(np.random.default_rng(seed), config)
        scene = ss._compose(background, placed, config.min_visible_pixels, noise)
        dropped += len(placed) - len(scene.classes)
        assert all(m.sum() >= 300 for m in scene.masks)
        unlabelled = ~scene.masks.any(axis=0)
        empty = ss._compose(background, [], 1, noise)
        np.testing.assert_array_equal(scene.image[unlabelled], empty.image[unlabelled])
    assert dropped > 0


def test_class_ids_in_range_and_every_class_appears():
    rng = np.random.default_rng(11)
    seen = np.zeros(len(CLASS_NAMES), int)
    config = SceneConfig(height=64, width=64, min_scale=0.2, max_scale=0.5)
    for _ in range(200):
        classes = render_scene(rng, config).classes
        assert ((classes >= 0) & (classes < len(CLASS_NAMES))).all()
        np.add.at(seen, classes, 1)
    assert (seen > 20).all(), seen
    assert len(set(CLASS_NAMES)) == 6


def test_clip_keeps_identity_and_moves_smoothly():
    config = SceneConfig(height=120, width=160, min_objects=3, max_objects=6, min_scale=0.1, max_scale=0.3)
    frames = list(render_clip(seed=2, frames=30, config=config))
    assert len(frames) == 30
    class_of = {}
    centroids = {}
    for t, frame in enumerate(frames):
        assert frame.image.shape == (120, 160, 3)
        assert len(set(frame.track_ids.tolist())) == len(frame.track_ids)
        assert frame.masks.sum(axis=0).max(initial=0) <= 1
        for track, cls, mask in zip(frame.track_ids, frame.classes, frame.masks):
            assert class_of.setdefault(int(track), int(cls)) == int(cls), "track changed class"
            ys, xs = np.nonzero(mask)
            centroids.setdefault(int(track), {})[t] = (xs.mean(), ys.mean())
    assert 3 <= len(class_of) <= 6
    moved, steps = 0, []
    for track, path in centroids.items():
        if 0 in path and 29 in path:
            moved += int(np.hypot(*np.subtract(path[29], path[0])) > 2.0)
        pairs = [t for t in range(29) if t in path and t + 1 in path]
        steps += [np.hypot(*np.subtract(path[t + 1], path[t])) for t in pairs]
    assert moved >= 2
    # Centroids of visible masks jump under occlusion, but most steps are small and smooth.
    assert np.median(steps) < 5.0
    assert not np.array_equal(frames[0].image, frames[1].image)


def test_clip_frames_validated():
    with pytest.raises(ValueError, match="frames"):
        render_clip(0, -1, SMALL)
    assert list(render_clip(0, 0, SMALL)) == []


def test_ground_truth_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    scenes = [render_scene(rng, SMALL) for _ in range(5)]
    scenes.append(render_scene(rng, dataclasses.replace(SMALL, min_objects=0, max_objects=0)))
    scenes += list(render_clip(9, 3, SMALL))
    path = tmp_path / "gt.npz"
    save_ground_truth(path, scenes)
    loaded = load_ground_truth(path)
    assert len(loaded) == len(scenes)
    assert len(loaded[5].classes) == 0 and loaded[5].masks.shape == (0, 96, 128)
    for original, back in zip(scenes, loaded):
        assert back.masks.dtype == bool and back.classes.dtype == np.int64 and back.boxes.dtype == np.float32
        _assert_same(original, back)
    assert load_class_names(path) == CLASS_NAMES
    raw_bytes = sum(s.masks.size for s in scenes) // 8
    assert path.stat().st_size < raw_bytes / 4

    # A scene without track ids and custom names round-trips as -1 ids.
    bare = ss.GroundTruth(scenes[0].masks, scenes[0].classes, scenes[0].boxes, None)
    save_ground_truth(tmp_path / "bare.npz", [bare], class_names=[f"c{i}" for i in range(6)])
    (back,) = load_ground_truth(tmp_path / "bare.npz")
    assert (back.track_ids == -1).all() and load_class_names(tmp_path / "bare.npz")[0] == "c0"


def test_ground_truth_rejects_bad_input(tmp_path):
    a = render_scene(np.random.default_rng(0), SMALL)
    b = render_scene(np.random.default_rng(0), SceneConfig(height=64, width=64))
    with pytest.raises(ValueError, match=r"scenes\[1\]\.masks"):
        save_ground_truth(tmp_path / "x.npz", [a, b])
    with pytest.raises(ValueError, match="classes"):
        save_ground_truth(tmp_path / "x.npz", [a], class_names=("only",))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(min_objects=5, max_objects=2), "max_objects"),
        (dict(min_objects=-1), "min_objects"),
        (dict(height=0), "height"),
        (dict(width=-5), "width"),
        (dict(min_scale=0.0), "min_scale"),
        (dict(min_scale=0.3, max_scale=0.2), "max_scale"),
        (dict(min_visible_pixels=0), "min_visible_pixels"),
        (dict(photo_probability=1.5), "photo_probability"),
        (dict(height=100.0), "height"),
        (dict(max_objects=True), "max_objects"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SceneConfig\.{field}\b"):
        SceneConfig(**kwargs)


def test_valid_config_edge_cases_accepted():
    SceneConfig(min_objects=0, max_objects=0, min_scale=0.2, max_scale=0.2, min_visible_pixels=1)
