"""Annotated video encoded in a process of its own, frames handed over through shared memory.

A writer thread in the pipeline's process shares the interpreter lock with the pipeline: each time the
encoder thread comes back from a C call it may wait for a busy pipeline thread to yield the lock, so
its rate falls with the pipeline's load. Here the encoder runs in a child process with its own
interpreter; ``write`` only copies the frame into a free slot of a shared-memory ring (a copy that
releases the lock) and writes the slot's number to the child's standard input. The child is started as
``python -m`` of this module, so it never imports the caller's main script (as a spawned
``multiprocessing`` child would). The child converts slot after slot into the encoder's input with
:class:`~inference_fastpath.workflows.video_files.FrameEncoder`, hands each slot back, and encodes on a
second thread while the next frame converts. When every slot is taken, ``write`` waits for one: frames
are never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import IO, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from inference_fastpath.workflows.video_files import FrameEncoder


class VideoWriterProcess:
    """Encodes BGR frames into ``path`` in a child process; same calls as ``BackgroundVideoWriter``.

    The ring is sized by the first frame (``slots`` frames of its shape); a later frame of another size
    is resized to it before the copy. ``encode_fps`` is the child's own rate (its slower stage's: the
    conversion or the encoding, whose busy seconds ``stage_seconds`` gives); ``encoder`` says which
    encoder the child opened (after ``close``).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "out.mp4")
        >>> with VideoWriterProcess(path, fps=25.0) as writer:
        ...     for _ in range(3):
        ...         writer.write(np.zeros((48, 64, 3), np.uint8))
        >>> writer.frames_written
        3
    """

    def __init__(self, path: Union[str, Path], fps: float, slots: int = 16, fourcc: str = "mp4v") -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.path, self.fps, self.fourcc, self.slots = str(path), float(fps), fourcc, int(slots)
        self.encoder: Optional[str] = None
        self.frames_written = 0
        self.encode_seconds = 0.0
        self.stage_seconds: dict = {}
        self.error: Optional[str] = None
        self._shape: Optional[Tuple[int, int, int]] = None
        self._ring: Optional[np.ndarray] = None
        self._free: List[int] = []
        self._child: Optional[subprocess.Popen] = None
        self._cleanup: Optional[weakref.finalize] = None
        self.memory_name: Optional[str] = None  # the shared-memory ring's name, once the first frame sized it
        self._closed = False

    def write(self, frame: np.ndarray) -> None:
        """Copy one BGR frame into the ring and queue it (waits while every slot is being encoded)."""
        if self._closed:
            raise RuntimeError(f"video writer for {self.path} is closed")
        if self._child is None:
            self._start(frame.shape)
        self._raise_if_failed()
        if frame.shape != self._shape:
            frame = cv2.resize(frame, (self._shape[1], self._shape[0]))
        slot = self._free_slot()
        np.copyto(self._ring[slot], frame)
        self._send(f"{slot}\n")

    def close(self) -> None:
        """Encode what is queued, close the file, end the child and free the ring."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._child is not None and self.error is None:
                self._send("end\n")
                while self._read_message() not in ("closed", None):
                    pass
                self._child.wait(timeout=60)
        finally:
            self._ring = None
            if self._cleanup is not None:
                self._cleanup()
        if self.error is not None:
            raise RuntimeError(f"video writer for {self.path} failed: {self.error}")

    @property
    def encode_fps(self) -> Optional[float]:
        return self.frames_written / self.encode_seconds if self.encode_seconds > 0 else None

    def __enter__(self) -> "VideoWriterProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ parent side

    def _start(self, shape: Tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"the video writer takes (H, W, 3) BGR frames, got shape {tuple(shape)}")
        self._shape = tuple(int(v) for v in shape)
        memory = SharedMemory(create=True, size=int(np.prod(self._shape)) * self.slots)
        self._ring = np.ndarray((self.slots, *self._shape), dtype=np.uint8, buffer=memory.buf)
        self.memory_name = memory.name
        self._free = list(range(self.slots))
        command = [sys.executable, "-m", __name__, "--memory", memory.name, "--slots", str(self.slots),
                   "--shape", ",".join(map(str, self._shape)), "--path", self.path, "--fps", repr(self.fps),
                   "--fourcc", self.fourcc]
        self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))})
        # the ring is unlinked and the child ended however this writer goes away (close, error, exit)
        self._cleanup = weakref.finalize(self, _release, memory, self._child)

    def _send(self, line: str) -> None:
        try:
            self._child.stdin.write(line)
        except (BrokenPipeError, OSError):
            self._child_ended()

    def _free_slot(self) -> int:
        while not self._free:
            if self._read_message() is None:
                self._child_ended()
        return self._free.pop()

    def _read_message(self) -> Optional[str]:
        """Handle one message from the child (a freed slot, a failure, the final report); None at its end."""
        line = self._child.stdout.readline()
        if not line:
            return None
        message = json.loads(line)
        kind = message["kind"]
        if kind == "slot":
            self._free.append(message["slot"])
        elif kind == "failed":
            self.error = self.error or message["error"]
        elif kind == "closed":
            self.frames_written, self.encode_seconds = message["frames"], message["seconds"]
            self.stage_seconds = {"convert": message["convert_seconds"], "encode": message["encode_seconds"]}
            self.encoder = message["encoder"]
        return kind

    def _raise_if_failed(self) -> None:
        if self._child.poll() is not None and self.error is None:
            self._child_ended()
        if self.error is not None:
            raise RuntimeError(f"video writer for {self.path} failed: {self.error}")

    def _child_ended(self) -> None:
        code = self._child.wait()
        self.error = self.error or f"the encoder process ended unexpectedly (exit code {code})"
        raise RuntimeError(f"video writer for {self.path} failed: {self.error}")


def _release(memory: SharedMemory, child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    try:
        memory.close()
    except BufferError:  # at interpreter exit the writer's ring view may still exist; unlinking still frees it
        pass
    memory.unlink()


def encode_slots(memory_name: str, slots: int, shape: Tuple[int, int, int], path: str, fps: float, fourcc: str,
                 todo: IO[str], done: IO[str], queued: int = 4) -> None:
    """The child's loop: take the slot numbers read from ``todo`` in order, convert each slot's frame into
    the encoder's input and hand the slot back on ``done`` at once, while a second thread encodes the
    converted frames (OpenCV and FFmpeg release the interpreter lock, so the two stages overlap; at most
    ``queued`` converted frames wait). At ``end``, close the file and report the frames, each stage's
    busy seconds and the encoder; ``seconds`` is the slower stage's (what bounds the writer's rate).
    After a failure the slots are still handed back, so the parent never waits for ever."""
    from multiprocessing import resource_tracker

    memory = SharedMemory(name=memory_name)
    resource_tracker.unregister(memory._name, "shared_memory")  # the parent owns the ring and unlinks it
    ring = np.ndarray((slots, *shape), dtype=np.uint8, buffer=memory.buf)
    encoder = FrameEncoder(path, fps, fourcc)
    busy = {"convert": 0.0, "encode": 0.0}
    failure: List[str] = []
    lock = threading.Lock()
    converted: "queue.Queue[object]" = queue.Queue(maxsize=queued)

    def report(**message) -> None:
        with lock:
            done.write(json.dumps(message) + "\n")
            done.flush()

    def fail(error: BaseException) -> None:
        if not failure:
            failure.append(f"{type(error).__name__}: {error}")
            report(kind="failed", error=failure[0])

    def encode_converted() -> None:
        while True:
            item = converted.get()
            if item is _END:
                break
            if not failure:
                try:
                    busy["encode"] += encoder.encode(item)
                except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
                    fail(error)

    encoding = threading.Thread(target=encode_converted, name="fastpath-encode", daemon=True)
    encoding.start()
    try:
        for line in todo:
            if line.strip() == "end":
                break
            slot = int(line)
            if not failure:
                try:
                    prepared, seconds = encoder.prepare(ring[slot])
                    busy["convert"] += seconds
                    converted.put(prepared)
                except Exception as error:  # noqa: BLE001
                    fail(error)
            report(kind="slot", slot=slot)
        converted.put(_END)
        encoding.join()
        started = time.perf_counter()
        try:
            encoder.release()  # the encoder's last frames: part of the encoding stage
        except Exception as error:  # noqa: BLE001
            fail(error)
        busy["encode"] += time.perf_counter() - started
        report(kind="closed", frames=encoder.frames, seconds=max(busy.values()), convert_seconds=busy["convert"],
               encode_seconds=busy["encode"], encoder=encoder.description)
    finally:
        del ring
        memory.close()


_END = object()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="the encoder child of VideoWriterProcess (not for direct use)")
    parser.add_argument("--memory", required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--fps", type=float, required=True)
    parser.add_argument("--fourcc", default="mp4v")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    encode_slots(args.memory, args.slots, shape, args.path, args.fps, args.fourcc, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
