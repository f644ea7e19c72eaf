"""The options object, threshold resolution and stage selection on a machine without a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from inference_fastpath.adapters.options import FastpathOptions, InvalidOptionError
from inference_fastpath.adapters.thresholds import resolve_threshold


@pytest.mark.parametrize(
    "field, value",
    [("preprocess", "cuda"), ("engine", "tensorrtx"), ("postprocess", "fast"), ("pipeline_depth", 3),
     ("precision", "int8"), ("mask_output", "polygon")],
)
def test_invalid_option_names_the_field_and_allowed_values(field, value):
    with pytest.raises(InvalidOptionError) as error:
        FastpathOptions(**{field: value})
    assert f"`{field}`" in str(error.value) and repr(value) in str(error.value)


def test_options_are_immutable_and_hashable():
    options = FastpathOptions.from_values({"engine": "torch", "unrelated": 1, "cuda_graphs": False})
    assert options.engine == "torch" and options.cuda_graphs is False
    with pytest.raises(Exception):
        options.engine = "onnx"  # type: ignore[misc]
    assert hash(options) == hash(FastpathOptions(engine="torch", cuda_graphs=False))


def test_thresholds_follow_stock_modes_and_per_class_overrides():
    names = ["a", "b", "c"]
    assert resolve_threshold("default", None, None, names) == pytest.approx(0.4)
    assert resolve_threshold("best", None, None, names) == pytest.approx(0.4)
    assert resolve_threshold("custom", 0.25, None, names) == pytest.approx(0.25)
    per_class = resolve_threshold("custom", 0.25, {"b": 0.9}, names)
    assert torch.allclose(per_class, torch.tensor([0.25, 0.9, 0.25]))
    with pytest.raises(ValueError, match="does not have"):
        resolve_threshold("default", None, {"zebra": 0.5}, names)
    with pytest.raises(ValueError, match="custom_confidence"):
        resolve_threshold("custom", None, None, names)
