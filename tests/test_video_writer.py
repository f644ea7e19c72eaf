"""The annotated-video writers (a thread, or a process fed through shared memory): PyAV's threaded MPEG-4
when PyAV imports, OpenCV's writer otherwise."""

import builtins
import contextlib
import os

import numpy as np
import pytest

from inference_fastpath.workflows.video_files import BackgroundVideoWriter, read_frames
from inference_fastpath.workflows.video_writer_process import VideoWriterProcess

WRITERS = [BackgroundVideoWriter, VideoWriterProcess]


def _frames(count: int, height: int = 64, width: int = 96):
    """Frames of distinct flat grey levels plus a gradient, so order and content can be read back."""
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return [np.clip(ramp + 20 + 15 * i, 0, 255).astype(np.uint8).repeat(height, 0).repeat(3, 2) for i in range(count)]


def _write(path, frames, writer_class=BackgroundVideoWriter, **kwargs):
    with writer_class(path, fps=25.0, **kwargs) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


@pytest.mark.parametrize("writer_class", WRITERS)
def test_pyav_writes_every_frame_in_order(tmp_path, writer_class):
    pytest.importorskip("av")
    frames = _frames(12)
    writer = _write(tmp_path / "out.mp4", frames, writer_class)
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


@pytest.mark.parametrize("writer_class", WRITERS)
@pytest.mark.parametrize("height, width", [(64, 96), (63, 97)])  # PyAV's path and OpenCV's
def test_a_frame_of_another_size_is_resized_not_dropped(tmp_path, height, width, writer_class):
    frames = _frames(4, height=height, width=width)
    frames[1] = np.zeros((32, 48, 3), np.uint8)
    writer = _write(tmp_path / "mixed.mp4", frames, writer_class)
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


def test_the_process_writer_waits_for_a_free_slot_rather_than_dropping_frames(tmp_path):
    frames = _frames(9)
    writer = _write(tmp_path / "few-slots.mp4", frames, VideoWriterProcess, slots=1)
    back = read_frames(tmp_path / "few-slots.mp4")
    assert writer.frames_written == len(back) == 9
    assert np.all(np.diff([b.mean() for b in back]) > 5)  # order kept through one reused slot


def test_the_process_writer_reports_its_slower_stage_as_its_rate(tmp_path):
    writer = _write(tmp_path / "stages.mp4", _frames(6), VideoWriterProcess, slots=2)
    convert, encode = writer.stage_seconds["convert"], writer.stage_seconds["encode"]
    assert convert > 0 and encode > 0
    assert writer.encode_fps == pytest.approx(6 / max(convert, encode))


def test_the_process_writer_frees_its_shared_memory_and_child(tmp_path):
    writer = VideoWriterProcess(tmp_path / "out.mp4", fps=25.0, slots=2)
    writer.write(_frames(1)[0])
    child, name = writer._child, writer.memory_name
    writer.close()
    assert child.poll() == 0
    assert not os.path.exists(f"/dev/shm/{name}")


def test_the_process_writer_reports_an_encoder_failure_naming_it(tmp_path):
    target = tmp_path / "no-such-dir" / "out.mp4"
    writer = VideoWriterProcess(target, fps=25.0, slots=2)
    with pytest.raises(RuntimeError, match="video writer for .*out.mp4 failed"):
        for frame in _frames(6):
            writer.write(frame)
        writer.close()
    with contextlib.suppress(RuntimeError):
        writer.close()  # closing again after the failure does not hang
    assert writer._child.poll() is not None and not os.path.exists(f"/dev/shm/{writer.memory_name}")


def test_the_process_writer_reports_a_dead_child(tmp_path):
    writer = VideoWriterProcess(tmp_path / "out.mp4", fps=25.0, slots=2)
    writer.write(_frames(1)[0])
    writer._child.kill()
    writer._child.wait()
    with pytest.raises(RuntimeError, match="ended unexpectedly"):
        for frame in _frames(4):
            writer.write(frame)


def test_a_process_writer_never_closed_frees_its_ring_at_exit(tmp_path):
    import subprocess
    import sys

    script = ("import numpy as np\n"
              "from inference_fastpath.workflows.video_writer_process import VideoWriterProcess\n"
              f"w = VideoWriterProcess({str(tmp_path / 'out.mp4')!r}, 25.0, slots=2)\n"
              "w.write(np.zeros((48, 64, 3), np.uint8))\n"
              "print(w.memory_name)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert not os.path.exists(f"/dev/shm/{done.stdout.strip()}")
