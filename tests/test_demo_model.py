"""The demo clip and the offline demo model package built from it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference_fastpath.examples.demo_model import (
    STAMP_FILE,
    build_demo_model,
    default_clip_path,
    count_clip_frames,
    evenly_spaced,
    read_clip_frames,
    run_reference_pipeline,
)


def test_clip_exists_decodes_and_is_small() -> None:
    path = default_clip_path()
    assert path.is_file(), "run `python -m inference_fastpath.examples.make_clip`"
    assert path.stat().st_size < 5 * 1024 * 1024
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    count = 0
    previous = None
    changed = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            assert frame.shape == (576, 768, 3)
            if previous is not None and np.abs(frame.astype(np.int16) - previous).mean() > 0.5:
                changed += 1
            previous = frame.astype(np.int16)
            count += 1
    finally:
        capture.release()
    assert count >= 100
    # It should look like video: (nearly) every frame differs from the one before.
    assert changed >= count - 2


@pytest.mark.slow
def test_demo_model_gives_a_realistic_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from inference_models import AutoModel

    monkeypatch.setenv("ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES", "True")
    clip = default_clip_path()
    # The shared cache dir is reused when its stamp matches (other tests use the same package).
    package = build_demo_model(clip_path=clip, seed=0)
    for name in (
        "model_config.json",
        "class_names.txt",
        "inference_config.json",
        "model_type.json",
        "weights.pth",
        STAMP_FILE,
    ):
        assert (package / name).is_file(), name
    stamp = json.loads((package / STAMP_FILE).read_text())
    assert "NOT a trained model" in stamp["note"]
    assert 5 <= stamp["calibration"]["mean_detections"] <= 20

    model = AutoModel.from_pretrained(str(package), device=torch.device("cpu"))
    frames = read_clip_frames(clip, evenly_spaced(count_clip_frames(clip), 5))
    results = run_reference_pipeline(model, frames)

    counts = [int(r.class_id.shape[0]) for r in results]
    assert all(3 <= c <= 30 for c in counts), counts
    assert 5 <= float(np.mean(counts)) <= 20, counts
    classes = {int(c) for r in results for c in r.class_id.tolist()}
    assert len(classes) > 1, classes
    for result in results:
        assert bool((result.confidence > 0.4).all())
        areas = result.mask.reshape(result.mask.shape[0], -1).sum(1)
        # Masks are non-trivial: most are neither empty nor the whole frame.
        frame_area = result.mask.shape[1] * result.mask.shape[2]
        partial = ((areas > 0) & (areas < frame_area)).sum().item()
        assert partial >= max(1, result.mask.shape[0] // 2), areas.tolist()


def test_cached_package_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A matching stamp short-circuits the build (no model work at all)."""
    from inference_fastpath.examples import demo_model

    out = tmp_path / "pkg"
    out.mkdir()
    clip = default_clip_path()
    key = demo_model._expected_stamp_key(3, demo_model.file_sha256(clip))
    for name in ("model_config.json", "model_type.json", "inference_config.json",
                 "class_names.txt", "weights.pth"):
        (out / name).write_text("placeholder")
    (out / STAMP_FILE).write_text(json.dumps(key))

    def fail(*args, **kwargs):
        raise AssertionError("package should have been reused")

    monkeypatch.setattr(demo_model, "_build_random_network", fail)
    assert build_demo_model(out_dir=out, clip_path=clip, seed=3) == out
    # A different seed does not match the stamp, so it would rebuild.
    with pytest.raises(AssertionError, match="reused"):
        build_demo_model(out_dir=out, clip_path=clip, seed=4)


def test_shapes_clip_and_its_ground_truth_agree(tmp_path) -> None:
    """The committed shapes clip decodes to as many frames as its ground truth holds, and the writer
    round-trips: a small regenerated clip has one ground-truth entry per frame, masks inside the frame."""
    from inference_fastpath.examples.make_clip import shapes_ground_truth_path, write_shapes_clip
    from inference_fastpath.examples.training.synthetic_scenes import CLASS_NAMES, load_ground_truth

    clip = default_clip_path().with_name("shapes_clip.mp4")
    truth = load_ground_truth(shapes_ground_truth_path(clip))
    assert count_clip_frames(clip) == len(truth) == 120
    assert all(t.masks.shape[1:] == (576, 768) for t in truth) and sum(len(t.classes) for t in truth) > 3 * 120
    out = write_shapes_clip(tmp_path / "small.mp4", num_frames=7, size=(96, 64), shots=2)
    small = load_ground_truth(shapes_ground_truth_path(out))
    assert count_clip_frames(out) == len(small) == 7
    assert all(t.masks.shape[1:] == (64, 96) and set(t.classes.tolist()) <= set(range(len(CLASS_NAMES))) for t in small)
    with pytest.raises(ValueError, match="one frame per shot"):
        write_shapes_clip(tmp_path / "bad.mp4", num_frames=1, shots=2)
