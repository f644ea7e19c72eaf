"""Compact masks (``supervision.CompactMask``) straight from the fused postprocess's run boundaries.

The device program writes, per mask, the positions ``k = x * H + y`` where its full-frame mask changes
value in COCO's column-major order. A ``CompactMask`` keeps each mask as column-major run lengths of
its foreground bounding box, so the crop's runs follow from those positions by arithmetic on the runs
alone: no full-frame array, no per-pixel work.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np
from supervision.detection.compact_mask import CompactMask


class CompactMasks(CompactMask):
    """A ``CompactMask`` that also takes the window index dense masks take, ``masks[:, y0:y1, x0:x1]``
    (stock ``dynamic_crop`` crops masks that way): it returns that window as a dense array, painted
    from the crops. Selections keep this class, so a selected subset can be windowed too.

    Example:
        >>> masks = compact_from_dense(np.eye(4, dtype=bool)[None])
        >>> masks[:, 1:3, 0:4].astype(int).tolist()
        [[[0, 1, 0, 0], [0, 0, 1, 0]]]
    """

    __slots__ = ()

    @classmethod
    def of(cls, masks: CompactMask) -> "CompactMasks":
        return masks if isinstance(masks, cls) else cls(masks._rles, masks._crop_shapes, masks._offsets,
                                                        masks._image_shape)

    def __getitem__(self, index: Any):
        if isinstance(index, tuple):
            return self._window(index)
        selected = super().__getitem__(index)
        return CompactMasks.of(selected) if isinstance(selected, CompactMask) else selected

    def _window(self, index: tuple) -> np.ndarray:
        rows, cols = (index + (slice(None), slice(None)))[1:3]
        if len(index) > 3 or not all(isinstance(part, slice) and part.step in (None, 1) for part in index[1:3]):
            return self.to_dense()[index]
        height, width = self._image_shape
        y0, y1, _ = rows.indices(height)
        x0, x1, _ = cols.indices(width)
        chosen = np.arange(len(self))[index[0]]
        chosen = np.atleast_1d(chosen)
        out = np.zeros((chosen.size, max(y1 - y0, 0), max(x1 - x0, 0)), dtype=bool)
        for slot, mask_index in enumerate(chosen):
            crop = self.crop(int(mask_index))
            cx, cy = (int(v) for v in self._offsets[mask_index])
            top, left = max(cy, y0), max(cx, x0)
            bottom, right = min(cy + crop.shape[0], y1), min(cx + crop.shape[1], x1)
            if top < bottom and left < right:
                out[slot, top - y0:bottom - y0, left - x0:right - x0] = crop[top - cy:bottom - cy, left - cx:right - cx]
        return out if np.ndim(np.arange(len(self))[index[0]]) else out[0]

    @staticmethod
    def merge(masks_list: List[CompactMask]) -> "CompactMasks":
        return CompactMasks.of(CompactMask.merge(masks_list))


def crop_runs(transitions: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
    """``(run lengths, (crop_h, crop_w), (x1, y1))`` of one mask's foreground box.

    ``transitions``: ascending full-frame column-major positions where the mask changes value (the
    pixel before the first counts as background). The runs start with a background run, as
    supervision's encoder writes them; an empty mask is one background pixel at (0, 0), as
    ``CompactMask.from_dense`` stores it.

    Example:
        >>> crop_runs(np.array([5, 7, 9, 11]), 4, 4)  # column 1 rows 1-2, column 2 rows 1-2
        (array([0, 4], dtype=int32), (2, 2), (1, 1))
    """
    t = frame_edges(transitions, height, width)
    if t.size == 0:
        return np.array([1], dtype=np.int32), (1, 1), (0, 0)
    x_start, y_start, x_end, y_end = _run_pixels(t[0::2], t[1::2], height)
    y1, y2, x1, x2 = (int(v[0]) for v in _boxes(x_start, y_start, x_end, y_end, np.zeros(1, np.int64), height))
    crop_h, crop_w = y2 - y1 + 1, x2 - x1 + 1
    bounds = np.empty(2 * x_start.size, dtype=np.int64)
    bounds[0::2] = (x_start - x1) * crop_h + (y_start - y1)
    bounds[1::2] = (x_end - x1) * crop_h + (y_end - y1) + 1
    # a run ending on the crop's bottom row and one starting on the next column's top row touch
    touching = bounds[1:-1:2] == bounds[2::2]
    if touching.any():
        keep = np.ones(bounds.size, dtype=bool)
        keep[1:-1:2] = ~touching
        keep[2::2] = ~touching
        bounds = bounds[keep]
    runs = np.diff(np.concatenate([[0], bounds, [crop_h * crop_w]]))
    if runs[-1] == 0:
        runs = runs[:-1]
    return runs.astype(np.int32), (crop_h, crop_w), (x1, y1)


def frame_edges(transitions: np.ndarray, height: int, width: int) -> np.ndarray:
    """A mask's foreground runs as edges ``[start, stop, start, stop, ...]`` in the full frame's
    column-major order: the transition positions, closed at the last pixel when the mask runs to it.

    Example:
        >>> frame_edges(np.array([5, 7, 14]), 4, 4).tolist()
        [5, 7, 14, 16]
    """
    t = np.asarray(transitions)
    if t.dtype.kind not in "iu" or height * width >= 2**31:
        t = t.astype(np.int64)
    # the device's int32 positions stay int32: every reader's pass over the runs moves half the bytes
    return np.append(t, np.asarray(height * width, dtype=t.dtype)) if t.size % 2 else t


def edge_boxes(edges: Sequence[np.ndarray], height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Every mask's foreground box from its full-frame edges (:func:`frame_edges`), as :func:`crop_runs`
    gives it without the runs: ``(crop shapes (N, 2) as (h, w), offsets (N, 2) as (x1, y1))``, int32.
    One pass over all the masks' runs: a frame of noisy masks holds tens of thousands.

    Example:
        >>> shapes, offsets = edge_boxes([np.array([5, 7, 9, 11]), np.array([], np.int64)], 4)
        >>> shapes.tolist(), offsets.tolist()
        ([[2, 2], [1, 1]], [[1, 1], [0, 0]])
    """
    count = len(edges)
    shapes = np.ones((count, 2), dtype=np.int32)  # an empty mask: 1x1 at (0, 0), as crop_runs gives it
    offsets = np.zeros((count, 2), dtype=np.int32)
    runs = np.array([e.size // 2 for e in edges], dtype=np.int64)
    painted = np.flatnonzero(runs)
    if painted.size == 0:
        return shapes, offsets
    starts = np.concatenate([edges[i][0:2 * runs[i]:2] for i in painted])
    stops = np.concatenate([edges[i][1:2 * runs[i]:2] for i in painted])
    if max(int(edges[i][2 * runs[i] - 1]) for i in painted) < 2**31:
        starts, stops = starts.astype(np.int32), stops.astype(np.int32)  # int32 division: several times faster
    first = np.concatenate([[0], np.cumsum(runs[painted])[:-1]])
    y1, y2, x1, x2 = _boxes(*_run_pixels(starts, stops, height), first, height)
    shapes[painted, 0], shapes[painted, 1] = y2 - y1 + 1, x2 - x1 + 1
    offsets[painted, 0], offsets[painted, 1] = x1, y1
    return shapes, offsets


def _run_pixels(starts: np.ndarray, stops: np.ndarray, height: int) -> Tuple[np.ndarray, ...]:
    """``(x_start, y_start, x_end, y_end)``: column and row of each run's first and last pixel."""
    x_start, x_end = starts // height, (stops - 1) // height
    return x_start, starts - x_start * height, x_end, stops - 1 - x_end * height


def _boxes(x_start: np.ndarray, y_start: np.ndarray, x_end: np.ndarray, y_end: np.ndarray, first: np.ndarray,
           height: int) -> Tuple[np.ndarray, ...]:
    """``(y1, y2, x1, x2)`` per mask, inclusive, for masks whose runs begin at indices ``first``."""
    # a run through the bottom of one column into the next: the box spans all rows
    wraps = np.maximum.reduceat(x_end > x_start, first)
    y1 = np.where(wraps, 0, np.minimum.reduceat(y_start, first))
    y2 = np.where(wraps, height - 1, np.maximum.reduceat(y_end, first))
    return y1, y2, np.minimum.reduceat(x_start, first), np.maximum.reduceat(x_end, first)


class LazyCompactMasks(CompactMasks):
    """``CompactMasks`` whose runs are worked out from the transition positions on first use: the
    compact and RLE outputs carry their masks this way, so a workflow that never reads the masks (a
    sink, trackers and analytics on boxes, the RLE serialised) never pays for them. Selections stay
    lazy, and one mask's crop is worked out alone.

    Example:
        >>> lazy = LazyCompactMasks([np.array([5, 7, 9, 11])], 4, 4)
        >>> len(lazy), lazy.shape, lazy.area.tolist()
        (1, (1, 4, 4), [4])
    """

    __slots__ = ("_transitions", "_built", "_boxes", "_edges")

    def __init__(self, per_mask: Sequence[np.ndarray], height: int, width: int) -> None:
        self._transitions = list(per_mask)
        self._built = None
        self._boxes = None
        self._edges = None  # every mask's full-frame run edges, once something reads them
        self._image_shape = (int(height), int(width))

    def __len__(self) -> int:
        return len(self._transitions)

    def _build(self) -> CompactMasks:
        if self._built is None:
            self._built = compact_from_transitions(self._transitions, *self._image_shape)
        return self._built

    def frame_edges(self) -> List[np.ndarray]:
        """Every mask's foreground runs as full-frame edges (:func:`frame_edges`), worked out once: the
        polygon-step rule and the painter both read them."""
        if self._edges is None:
            self._edges = [frame_edges(t, *self._image_shape) for t in self._transitions]
        return self._edges

    @property
    def area(self) -> np.ndarray:
        """Foreground pixels per mask, counted on the runs' edges (nothing built)."""
        return np.array([int(e[1::2].sum() - e[0::2].sum()) for e in self.frame_edges()], dtype=np.int64)

    def _crop_geometry(self) -> Tuple[np.ndarray, np.ndarray]:
        """(crop shapes, offsets) of every mask's foreground box, worked out without the runs."""
        if self._built is not None:
            return self._built._crop_shapes, self._built._offsets
        if self._boxes is None:
            self._boxes = edge_boxes(self.frame_edges(), self._image_shape[0])
        return self._boxes

    def crop(self, index: int) -> np.ndarray:
        """Mask ``index``'s foreground box as a dense array, worked out for this mask alone."""
        if self._built is not None:
            return self._built.crop(index)
        runs, shape, offset = crop_runs(self._transitions[index], *self._image_shape)
        return CompactMask([runs], np.array([shape], np.int32), np.array([offset], np.int32), self._image_shape).crop(0)

    def __getitem__(self, index: Any):
        if self._built is not None or isinstance(index, (int, np.integer, tuple)):
            return super().__getitem__(index)
        # a selection stays lazy: dropping detections builds nothing. Positions as supervision reads them.
        if isinstance(index, slice):
            chosen = np.arange(len(self))[index]
        elif isinstance(index, np.ndarray) and index.dtype == bool:
            chosen = np.flatnonzero(index)
        elif isinstance(index, list) and all(isinstance(item, (bool, np.bool_)) for item in index):
            chosen = np.flatnonzero(np.asarray(index, dtype=bool))
        else:
            chosen = np.asarray(list(index), dtype=np.intp)
        return LazyCompactMasks([self._transitions[int(i)] for i in chosen], *self._image_shape)

    def __reduce__(self):
        # copy.deepcopy and pickle would otherwise restore the parent's slots through these read-only
        # properties and fail; the Execution Engine deep-copies every output it moves to root coordinates
        return (type(self), (self._transitions, *self._image_shape))

    _rles = property(lambda self: self._build()._rles)
    _crop_shapes = property(lambda self: self._crop_geometry()[0])
    _offsets = property(lambda self: self._crop_geometry()[1])


def run_edges(masks: CompactMask) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    """Every mask's foreground runs as edges ``[start, stop, ...]`` (column-major), with the column
    height and the top-left corner ``(x, y)`` of the region they count in: the block's lazy masks as
    their full frame's runs (no crop built), any other ``CompactMask`` as its crops' runs.

    Example:
        >>> edges, heights, corners = run_edges(LazyCompactMasks([np.array([5, 7])], 4, 4))
        >>> [e.tolist() for e in edges], heights.tolist(), corners.tolist()
        ([[5, 7]], [4], [[0, 0]])
    """
    count = len(masks)
    if isinstance(masks, LazyCompactMasks):
        return (masks.frame_edges(), np.full(count, masks.shape[1], dtype=np.int64),
                np.zeros((count, 2), dtype=np.int64))
    edges = [np.cumsum(np.asarray(counts, dtype=np.int64)) for counts in masks._rles]
    shapes = np.asarray(masks._crop_shapes, dtype=np.int64).reshape(-1, 2)
    return edges, shapes[:, 0], np.asarray(masks._offsets, dtype=np.int64).reshape(-1, 2)


def compact_from_transitions(per_mask: Sequence[np.ndarray], height: int, width: int) -> CompactMask:
    """One frame's masks as a ``CompactMask`` (``per_mask``: each mask's transition positions)."""
    rles: List[np.ndarray] = []
    shapes = np.empty((len(per_mask), 2), dtype=np.int32)
    offsets = np.empty((len(per_mask), 2), dtype=np.int32)
    for index, transitions in enumerate(per_mask):
        runs, shapes[index], offsets[index] = crop_runs(transitions, height, width)
        rles.append(runs)
    return CompactMasks(rles, shapes, offsets, (int(height), int(width)))


def compact_from_dense(masks: np.ndarray) -> CompactMask:
    """The same ``CompactMask`` built by supervision's own encoder from dense ``(N, H, W)`` masks
    (each cropped to its foreground box): the reference twin of :func:`compact_from_transitions`."""
    height, width = masks.shape[1:]
    boxes = np.tile(np.array([0, 0, -1, -1], dtype=np.float64), (len(masks), 1))  # empty: 1x1 at (0, 0)
    for index, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[index] = (cols[0], rows[0], cols[-1], rows[-1])
    return CompactMasks.of(CompactMask.from_dense(masks, boxes, image_shape=(int(height), int(width))))
