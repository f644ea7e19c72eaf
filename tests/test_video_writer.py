"""The annotated-video writer: PyAV's threaded MPEG-4 when PyAV imports, OpenCV's writer otherwise."""

import builtins

import numpy as np
import pytest

from inference_fastpath.workflows.video_files import BackgroundVideoWriter, read_frames


def _frames(count: int, height: int = 64, width: int = 96):
    """Frames of distinct flat grey levels plus a gradient, so order and content can be read back."""
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return [np.clip(ramp + 20 + 15 * i, 0, 255).astype(np.uint8).repeat(height, 0).repeat(3, 2) for i in range(count)]


def _write(path, frames, **kwargs) -> BackgroundVideoWriter:
    with BackgroundVideoWriter(path, fps=25.0, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


def test_pyav_writes_every_frame_in_order(tmp_path):
    pytest.importorskip("av")
    frames = _frames(12)
    writer = _write(tmp_path / "out.mp4", frames)
    assert writer.encoder == "pyav-mpeg4-threaded"
    back = read_frames(tmp_path / "out.mp4")  # OpenCV reads it, as it reads its own mp4v files
    assert len(back) == len(frames) == writer.frames_written
    assert back[0].shape == frames[0].shape
    errors = [np.abs(b.astype(np.int16) - f.astype(np.int16)).mean() for b, f in zip(back, frames)]
    assert max(errors) < 4.0, errors
    assert np.all(np.diff([b.mean() for b in back]) > 5)  # order kept
    assert writer.encode_fps and writer.encode_fps > 0


def test_without_pyav_opencv_writes_and_says_why(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    writer = _write(tmp_path / "out.mp4", _frames(5))
    assert writer.encoder.startswith("opencv-mp4v (PyAV is not installed")
    assert len(read_frames(tmp_path / "out.mp4")) == 5


def test_odd_frame_sizes_go_to_opencv(tmp_path):
    writer = _write(tmp_path / "odd.mp4", _frames(4, height=63, width=97))
    assert "odd frame size 97x63" in writer.encoder
    assert len(read_frames(tmp_path / "odd.mp4")) == 4


@pytest.mark.parametrize("height, width", [(64, 96), (63, 97)])  # PyAV's path and OpenCV's
def test_a_frame_of_another_size_is_resized_not_dropped(tmp_path, height, width):
    frames = _frames(4, height=height, width=width)
    frames[1] = np.zeros((32, 48, 3), np.uint8)
    writer = _write(tmp_path / "mixed.mp4", frames)
    back = read_frames(tmp_path / "mixed.mp4")
    assert writer.frames_written == 4 and len(back) == 4
    assert back[1].shape == back[0].shape  # OpenCV's mp4v trims odd sides to even ones


@pytest.mark.parametrize("height,width", [(2, 2), (2, 4), (6, 10), (576, 768), (1080, 1920)])
def test_our_yuv_conversion_is_within_two_levels_of_ffmpegs(height, width):
    av = pytest.importorskip("av")
    from inference_fastpath.workflows.video_files import bgr_to_i420

    frame = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = av.VideoFrame.from_ndarray(frame, format="bgr24").reformat(format="yuv420p").to_ndarray()
    ours = bgr_to_i420(frame)
    assert ours.shape == reference.shape
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 2


def test_yuv_conversion_refuses_odd_sides():
    from inference_fastpath.workflows.video_files import bgr_to_i420

    with pytest.raises(ValueError, match="even sides"):
        bgr_to_i420(np.zeros((3, 4, 3), np.uint8))
