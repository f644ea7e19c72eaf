"""Video files for workflows: read frames, write clips, and write annotated video off the pipeline's thread."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import cv2
import numpy as np


def read_frames(path: Union[str, Path], count: int = 1 << 30, step: int = 1) -> List[np.ndarray]:
    """Up to `count` frames of the video, taking every `step`-th one."""
    capture = cv2.VideoCapture(str(path))
    frames: List[np.ndarray] = []
    index = 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(frame)
        index += 1
    capture.release()
    return frames


def write_clip(path: Union[str, Path], frames: List[np.ndarray], fps: float = 25.0) -> Path:
    """Encodes frames as an mp4v video that OpenCV reads back on any machine."""
    if not frames:
        raise ValueError("write_clip needs at least one frame")
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return Path(path)


def frame_count(path: Union[str, Path]) -> int:
    """Frames the container declares (0 when it declares none)."""
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    capture.release()
    return count


def video_fps(path: Union[str, Path], default: float = 25.0) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or default
    capture.release()
    return fps


class BackgroundVideoWriter:
    """Encodes frames on its own thread, so a pipeline's sink only hands a frame over.

    The queue is bounded (``max_pending`` frames): when the encoder falls behind, ``write`` waits
    rather than dropping a frame. ``encode_fps`` is the encoder's own rate (frames over the time it
    spent encoding), whatever the producer's rate. The file is MPEG-4 part 2 (OpenCV's ``mp4v``),
    encoded by FFmpeg through PyAV on all cores when PyAV is installed (``inference`` installs it),
    else by OpenCV on one thread; ``encoder`` says which, and why when it is OpenCV.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "out.mp4")
        >>> with BackgroundVideoWriter(path, fps=25.0) as writer:
        ...     for _ in range(3):
        ...         writer.write(np.zeros((48, 64, 3), np.uint8))
        >>> writer.frames_written
        3
    """

    def __init__(self, path: Union[str, Path], fps: float, max_pending: int = 64, fourcc: str = "mp4v") -> None:
        self.path = str(path)
        self.fps = float(fps)
        self.fourcc = fourcc
        self.encoder: Optional[str] = None
        self.frames_written = 0
        self.encode_seconds = 0.0
        self.error: Optional[BaseException] = None
        self._queue: "queue.Queue[Optional[np.ndarray]]" = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._encode, name="fastpath-video-writer", daemon=True)
        self._thread.start()

    def write(self, frame: np.ndarray) -> None:
        """Queue one BGR frame (the writer keeps a reference: do not modify it afterwards)."""
        if self.error is not None:
            raise RuntimeError(f"video writer for {self.path} failed") from self.error
        self._queue.put(frame)

    def close(self) -> None:
        """Encode what is queued, then close the file."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"video writer for {self.path} failed") from self.error

    @property
    def encode_fps(self) -> Optional[float]:
        return self.frames_written / self.encode_seconds if self.encode_seconds > 0 else None

    def __enter__(self) -> "BackgroundVideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _encode(self) -> None:
        encoder = FrameEncoder(self.path, self.fps, self.fourcc)
        while True:
            frame = self._queue.get()
            if frame is None:
                break
            if self.error is not None:
                continue  # keep draining so producers never block on a dead writer
            try:
                self.encode_seconds += encoder.write(frame)
                self.frames_written += 1
                self.encoder = encoder.description
            except BaseException as error:  # noqa: BLE001 - reported to the producer on its next call
                self.error = error
        started = time.perf_counter()
        try:
            encoder.release()  # flushes the encoder's last frames: part of the encoding time, as in the process writer
        except BaseException as error:  # noqa: BLE001
            self.error = self.error or error
        self.encode_seconds += time.perf_counter() - started


class FrameEncoder:
    """One output file's encoder, opened on the first frame (its size fixes the file's); later frames of
    another size are resized to it, never dropped. Used by both background writers.

    Example:
        >>> import tempfile, os
        >>> encoder = FrameEncoder(os.path.join(tempfile.mkdtemp(), "out.mp4"), 25.0)
        >>> seconds = encoder.write(np.zeros((48, 64, 3), np.uint8)); encoder.release()
        >>> encoder.frames
        1
    """

    def __init__(self, path: str, fps: float, fourcc: str = "mp4v") -> None:
        self.path, self.fps, self.fourcc = path, fps, fourcc
        self.description: Optional[str] = None
        self.frames = 0
        self._writer = None
        self._size: Optional[Tuple[int, int]] = None

    def write(self, frame: np.ndarray) -> float:
        """Encode one BGR frame; returns the seconds it took (the first frame's include opening the file)."""
        prepared, seconds = self.prepare(frame)
        return seconds + self.encode(prepared)

    def prepare(self, frame: np.ndarray) -> Tuple[Any, float]:
        """The first half of ``write``: (the encoder's input for ``frame``, seconds). The input never
        shares memory with ``frame``, so a caller may reuse the frame's buffer at once while another
        thread runs ``encode`` (the process writer pipelines the two)."""
        started = time.perf_counter()
        if self._writer is None:
            self._size = (frame.shape[1], frame.shape[0])
            self._writer, self.description = _open_encoder(self.path, self.fps, self._size, self.fourcc)
        if (frame.shape[1], frame.shape[0]) != self._size:
            frame = cv2.resize(frame, self._size)  # OpenCV's writer would drop it without a word
        return self._writer.prepare(frame), time.perf_counter() - started

    def encode(self, prepared: Any) -> float:
        """The second half of ``write``: encode what ``prepare`` returned; returns the seconds it took."""
        started = time.perf_counter()
        self._writer.encode(prepared)
        self.frames += 1
        return time.perf_counter() - started

    def release(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


class _PyAvEncoder:
    """MPEG-4 part 2 through FFmpeg's own encoder, slice-threaded over the machine's cores."""

    def __init__(self, av, path: str, fps: float, size: Tuple[int, int]) -> None:
        from fractions import Fraction

        self._av = av
        self._container = av.open(path, "w")
        self._stream = self._container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.bit_rate = 8 * size[0] * size[1]  # about what OpenCV's mp4v writer gives such frames
        self._stream.thread_type = "AUTO"
        self._stream.thread_count = 0  # FFmpeg's choice: one per core

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        # FFmpeg's own bgr24 -> yuv420p conversion (swscale, one thread) costs more than the threaded encode.
        return bgr_to_i420(frame)

    def encode(self, planes: np.ndarray) -> None:
        picture = self._av.VideoFrame.from_ndarray(planes, format="yuv420p")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)

    def release(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


# OpenCV's YCrCb is full-range BT.601 chroma (JPEG); limited range scales it by 224/255 around 128.
_LIMITED_CHROMA_SCALE = 224.0 / 255.0


def bgr_to_i420(frame: np.ndarray) -> np.ndarray:
    """A BGR uint8 frame (even sides) as planar YUV 4:2:0 (I420, ``(H * 3 / 2, W)``), BT.601 limited range.

    Within 2 levels of FFmpeg's own conversion and several times faster (every step is one of OpenCV's
    vectorised passes). The luma plane is OpenCV's ``COLOR_BGR2YUV_I420`` (the same BT.601 matrix). Its
    chroma samples one pixel of each 2x2 box where FFmpeg averages the box, so the chroma here comes from
    the box-averaged frame instead (the conversion is linear: averaging first matches FFmpeg up to
    rounding), as full-range YCrCb scaled to the limited range.

    Example:
        >>> bgr_to_i420(np.zeros((2, 4, 3), np.uint8)).tolist()
        [[16, 16, 16, 16], [16, 16, 16, 16], [128, 128, 128, 128]]
    """
    height, width = frame.shape[:2]
    if height % 2 or width % 2 or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"bgr_to_i420 needs an (H, W, 3) uint8 frame with even sides, got {frame.shape} {frame.dtype}")
    frame = np.ascontiguousarray(frame)
    planes = cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420)
    boxes = cv2.resize(frame, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    full = cv2.cvtColor(boxes, cv2.COLOR_BGR2YCrCb)
    limited = cv2.addWeighted(full, _LIMITED_CHROMA_SCALE, full, 0.0, 128.0 * (1.0 - _LIMITED_CHROMA_SCALE))
    quarter = (height // 2) * (width // 2)
    chroma = planes[height:].reshape(-1)  # U (Cb) then V (Cr), each (H/2) x (W/2), contiguous
    chroma[:quarter] = limited[..., 2].reshape(-1)
    chroma[quarter:] = limited[..., 1].reshape(-1)
    return planes


def _open_encoder(path: str, fps: float, size: Tuple[int, int], fourcc: str):
    """(encoder, description): PyAV's threaded MPEG-4 for ``mp4v``, OpenCV's writer otherwise."""
    reason = None
    if fourcc != "mp4v":
        reason = f"fourcc {fourcc!r} is OpenCV's"
    elif size[0] % 2 or size[1] % 2:
        reason = f"odd frame size {size[0]}x{size[1]} (MPEG-4's 4:2:0 needs even sides)"
    else:
        try:
            import av
        except ImportError as error:
            reason = f"PyAV is not installed ({error})"
        else:
            return _PyAvEncoder(av, path, fps, size), "pyav-mpeg4-threaded"
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot open {path} for writing")
    return _OpenCvEncoder(writer), f"opencv-{fourcc} ({reason})"


class _OpenCvEncoder:
    """OpenCV's writer behind the same prepare/encode halves as the PyAV encoder."""

    def __init__(self, writer: "cv2.VideoWriter") -> None:
        self._writer = writer

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        return np.array(frame)  # a copy: the caller may reuse the frame's buffer before the encode

    def encode(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def release(self) -> None:
        self._writer.release()

