"""What the exported-model engines (ONNX Runtime, TensorRT) share: a batch split for a model whose
batch size is limited, and the order of its three outputs."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple


def plan_batch_chunks(
    batch_size: int, min_batch: Optional[int], max_batch: Optional[int]
) -> List[Tuple[int, int, int]]:
    """Splits a batch for a model with batch limits.

    Returns ``(start, stop, run_batch)`` triples: rows ``start:stop`` run as one forward of
    ``run_batch`` rows (``run_batch > stop - start`` means the chunk is zero-padded to the model's
    minimum / static batch size).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if min_batch is not None and max_batch is not None and min_batch > max_batch:
        raise ValueError(f"invalid batch limits: min {min_batch} > max {max_batch}")
    step = batch_size if max_batch is None else max_batch
    chunks = []
    for start in range(0, batch_size, step):
        stop = min(start + step, batch_size)
        run = stop - start
        if min_batch is not None and run < min_batch:
            run = min_batch
        chunks.append((start, stop, run))
    return chunks


def order_output_names(names: Sequence[str]) -> Tuple[str, str, str]:
    """Orders three output names as (boxes, logits, masks).

    Recognises the usual spellings (``dets``/``boxes``/``pred_boxes``, ``labels``/``logits``/
    ``pred_logits``, ``masks``/``pred_masks``); anything else keeps the given order, which is the
    order of RF-DETR exports (boxes, class logits, mask logits).
    """
    if len(names) != 3:
        raise ValueError(f"expected 3 outputs (boxes, logits, masks), got {list(names)}")
    patterns = (("box", "det"), ("logit", "label", "class", "score"), ("mask",))
    picked = []
    for options in patterns:
        found = [n for n in names if any(o in n.lower() for o in options)]
        if len(found) != 1:
            return names[0], names[1], names[2]
        picked.append(found[0])
    if len(set(picked)) != 3:
        return names[0], names[1], names[2]
    return picked[0], picked[1], picked[2]
