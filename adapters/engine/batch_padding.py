"""Partial batches padded to a few sizes, so a stage with CUDA graphs replays a handful of graphs
instead of capturing one per batch size.

A live pipeline with a batch collection timeout hands a step batches of changing sizes (sources
that lag, stall or end). :func:`graph_batch_size` maps each to the graph it replays;
:class:`BatchPadding` keeps the largest batch seen and says when to capture the smaller padded
sizes ahead of need. The torch engine and the fused postprocess each keep one.
"""

from __future__ import annotations

from typing import List, Optional

# Graphs (or fused-postprocess programs) a stage keeps: the padded batch sizes of up to 64 sources
# (1, 2, 4, ..., 64) and a spare
GRAPH_CACHE_SIZE = 8


def graph_batch_size(batch_size: int, largest: int) -> int:
    """Rows a graph replay runs for ``batch_size`` frames when ``largest`` is the biggest batch seen.

    Batches of the largest size (or larger, which become the new largest) run as they are; smaller,
    partial ones, as a batch collection timeout hands over, run in the graph of the next power of
    two, never above the largest. Once a pipeline of N sources has delivered a full batch, its partial
    batches take at most ceil(log2 N) + 1 sizes, whatever sizes they come in, instead of one capture
    per size. Batches that grow one by one before that (sources coming online) still run unpadded.

    Example:
        >>> [graph_batch_size(n, 12) for n in (1, 3, 5, 8, 9, 12, 13)]
        [1, 4, 8, 8, 12, 12, 13]
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if batch_size >= largest:
        return batch_size
    return min(1 << (batch_size - 1).bit_length(), largest)


class BatchPadding:
    """The padded size of each batch (:func:`graph_batch_size`) under the largest batch seen so far,
    which never shrinks. One per stage, called with the stage's lock held.

    It also says when to capture the smaller padded sizes ahead of need (:meth:`sizes_to_prepare`):
    otherwise the first partial batch of each size pays a capture mid-stream, as a clip's last
    batches do when its sources end one by one, or a camera that stalls.

    Example:
        >>> padding = BatchPadding(prepare_after=2)
        >>> [padding(n) for n in (8, 3, 5, 8)]
        [8, 4, 8, 8]
        >>> padding.sizes_to_prepare(), padding.sizes_to_prepare(), padding.sizes_to_prepare()
        ([], [1, 2, 4], [])
    """

    def __init__(self, prepare_after: int = 8) -> None:
        if prepare_after < 1:
            raise ValueError(f"prepare_after must be >= 1, got {prepare_after}")
        self.largest = 0
        self.prepare_after = int(prepare_after)
        self._batches_at_largest = 0  # batches since the largest last grew
        self._prepared_for = 0  # the largest whose smaller sizes were last handed out

    def __call__(self, batch_size: int) -> int:
        if batch_size > self.largest:
            self.largest = batch_size
            self._batches_at_largest = 0
        return graph_batch_size(batch_size, self.largest)

    @property
    def sizes_pending(self) -> bool:
        """Whether the smaller sizes of the current largest batch are still to be handed out."""
        return self.largest > 1 and self._prepared_for != self.largest

    def sizes_to_prepare(self, room: Optional[int] = None) -> List[int]:
        """Call once per batch: the padded sizes below the largest, smallest first, handed out once
        the largest has held for ``prepare_after`` batches; otherwise ``[]``. At most the ``room``
        largest of them (None: all): what a stage's cache holds beside the largest batch's own graph.

        Waiting for the largest to hold keeps sources that come online one by one (batches growing
        1, 2, 3, ...) from triggering a round of captures at each step.
        """
        if not self.sizes_pending:
            return []
        self._batches_at_largest += 1
        if self._batches_at_largest < self.prepare_after:
            return []
        self._prepared_for = self.largest
        sizes = padded_sizes_below(self.largest)
        if room is None:
            return sizes
        return sizes[max(0, len(sizes) - room):] if room > 0 else []


def padded_sizes_below(largest: int) -> List[int]:
    """The sizes :func:`graph_batch_size` pads a partial batch to under ``largest``, smallest first.

    Example:
        >>> padded_sizes_below(12)
        [1, 2, 4, 8]
    """
    return [1 << i for i in range(max(0, (largest - 1).bit_length()))]
