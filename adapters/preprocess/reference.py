"""Reference preprocess: inference-models' own RF-DETR preprocessing, called as the stock path does."""

from __future__ import annotations

from typing import Sequence

from typing import Optional

from inference_fastpath.adapters.contracts import Frame, InputBuffer, PreprocessedBatch


class ReferencePreprocess:
    """Delegates to ``model.pre_process`` (PIL antialiased resize, /255, ImageNet normalisation)."""

    name = "reference"

    def __init__(self, model) -> None:
        self._model = model

    def __call__(self, frames: Sequence[Frame], input_buffer: Optional[InputBuffer] = None) -> PreprocessedBatch:
        # the engine copies this tensor into its own input buffer: the reference does not write there
        tensor, metadata = self._model.pre_process(list(frames), input_color_format="bgr")
        return PreprocessedBatch(tensor=tensor, metadata=list(metadata))
