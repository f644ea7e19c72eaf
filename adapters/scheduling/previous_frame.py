"""Downstream overlap: each step run delivers the previous run's frames, so later steps overlap the GPU.

The Execution Engine resolves a step's output futures before any step wired to them runs, so with a
visualization after the segmentation step every frame runs launch -> GPU -> postprocess -> painting in
series, even at ``pipeline_depth=2``. With downstream overlap, run N launches frame N and returns frame
N-1's finished outputs together with frame N-1's image: the downstream steps paint frame N-1 on the host
while the GPU works on frame N. InferencePipeline keeps the pairing right because the step reports
``stream_pipeline_depth() == 1`` (it emits run N's workflow outputs with run N-1's video frames) and asks
for the last frame through ``flush_stream_pipeline_outputs()`` when the video ends.

The first run has nothing to deliver: its outputs are all ``None``, so the Execution Engine skips every
downstream step for it (no tracker or sink sees a frame twice) and InferencePipeline drops that run's
result. Steps after ours must take the image from our ``image`` output, never from ``$inputs.image``
(which is one frame ahead).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

Indices = List[Tuple[int, ...]]


class BatchSizeChanged(ValueError):
    """A run brought a different number of frames than the run whose outputs it has to deliver."""


@dataclass(frozen=True)
class _Held:
    indices: Indices
    images: Tuple[Any, ...]
    results: Tuple[Any, ...]  # an output dict per frame, or a Future of one (depth 2)


class PreviousFrameDelivery:
    """Holds one run's results and hands them out, resolved and with their images, on the next run.

    Example:
        >>> delivery = PreviousFrameDelivery(keys=("predictions",), image_key="image")
        >>> delivery.exchange(["frame-1"], [{"predictions": 1}])
        [{'predictions': None, 'image': None}]
        >>> delivery.exchange(["frame-2"], [{"predictions": 2}])
        [{'predictions': 1, 'image': 'frame-1'}]
        >>> delivery.drain()
        [([(0,)], [{'predictions': 2, 'image': 'frame-2'}])]
    """

    def __init__(self, keys: Sequence[str], image_key: str) -> None:
        self.keys = tuple(keys)
        self.image_key = image_key
        self._held: Optional[_Held] = None

    @property
    def holding(self) -> int:
        """How many frames wait for the next run (or the flush)."""
        return 0 if self._held is None else len(self._held.images)

    def exchange(self, images: Sequence[Any], results: Sequence[Any]) -> List[Dict[str, Any]]:
        """Keep this run's ``results`` (one per image) and return the previous run's outputs.

        Raises ``BatchSizeChanged`` when the previous run had another number of frames: the Execution
        Engine registers a step's outputs at the current run's batch indices, so they must line up.
        """
        if len(images) != len(results):
            raise ValueError(f"{len(results)} results for {len(images)} images")
        previous = self._held
        if previous is not None and len(previous.images) != len(images):
            raise BatchSizeChanged(
                f"downstream_overlap delivers the previous run's {len(previous.images)} frame(s) in a run of "
                f"{len(images)} frame(s); it needs the same number of frames in every run (one video source "
                "per pipeline, or sources that never end early). Switch downstream_overlap off for this workflow."
            )
        self._held = _Held(indices=_indices_of(images), images=tuple(images), results=tuple(results))
        if previous is None:
            return [self._nothing() for _ in images]
        return self._outputs(previous)

    def drain(self) -> List[Tuple[Indices, List[Dict[str, Any]]]]:
        """The held frames' outputs as ``[(batch indices, outputs)]`` (the runtime's flush format); empties it."""
        held, self._held = self._held, None
        return [] if held is None else [(held.indices, self._outputs(held))]

    def discard(self) -> int:
        """Drop what is held (the pipeline closed without a flush); returns how many frames were dropped."""
        dropped, self._held = self.holding, None
        return dropped

    def _nothing(self) -> Dict[str, Any]:
        return {key: None for key in (*self.keys, self.image_key)}

    def _outputs(self, held: _Held) -> List[Dict[str, Any]]:
        outputs = []
        for image, result in zip(held.images, held.results):
            resolved = result.result() if isinstance(result, Future) else result
            outputs.append({**{key: resolved[key] for key in self.keys}, self.image_key: image})
        return outputs


def _indices_of(images: Sequence[Any]) -> Indices:
    indices = getattr(images, "indices", None)
    return list(indices) if indices is not None else [(i,) for i in range(len(images))]
