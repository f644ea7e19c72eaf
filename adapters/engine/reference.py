"""Reference engine: the inference-models model's own ``forward`` (eager, no CUDA graphs).

It shares :class:`EngineBase` with the fast engines (its own stream, static input buffers, the
``release`` contract), so every engine has one signature; only the forward differs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from inference_fastpath.adapters.engine.base import EngineBase, OutputTriple, model_input_hw


class ReferenceEngine(EngineBase):
    """Runs the inference-models model's own ``forward`` (the universal fallback).

    Example:
        >>> engine = ReferenceEngine(model)  # doctest: +SKIP
        >>> raw = engine(batch)  # doctest: +SKIP
    """

    name = "reference"
    supports_cuda_graphs = False

    def __init__(self, model: Any, *, device: Optional[torch.device] = None, cuda_graphs: bool = False, **kwargs: Any) -> None:
        self._model = model
        dev = device if device is not None else getattr(model, "_device", None)
        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(
            device=torch.device(dev), input_hw=model_input_hw(model), cuda_graphs=cuda_graphs, **kwargs
        )

    def _forward(self, x: torch.Tensor) -> OutputTriple:
        result = self._model.forward(x)
        if isinstance(result, dict):
            return result["pred_boxes"], result["pred_logits"], result["pred_masks"]
        # ONNX / TRT models of inference-models return (boxes, logits, masks) tuples.
        boxes, logits, masks = result[:3]
        return boxes, logits, masks
