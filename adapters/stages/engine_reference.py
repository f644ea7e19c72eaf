"""Reference engine: the inference-models model's own ``forward`` (eager, no graphs)."""

from __future__ import annotations

from inference_fastpath.adapters.stages.contracts import PreprocessedBatch, RawOutputs


class ReferenceEngine:
    name = "reference"

    def __init__(self, model) -> None:
        self._model = model

    def __call__(self, batch: PreprocessedBatch) -> RawOutputs:
        outputs = self._model.forward(batch.tensor)
        if isinstance(outputs, dict):
            return RawOutputs(
                boxes=outputs["pred_boxes"], logits=outputs["pred_logits"], masks=outputs["pred_masks"]
            )
        # ONNX / TRT models of inference-models return (boxes, logits, masks) tuples.
        boxes, logits, masks = outputs[:3]
        return RawOutputs(boxes=boxes, logits=logits, masks=masks)
