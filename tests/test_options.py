"""The options object, threshold resolution and stage selection on a machine without a GPU."""

from __future__ import annotations


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


@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("true", True), ("0", False), ("1", True)])
def test_cuda_graphs_text_from_a_selector_parses_as_in_the_json(text, expected):
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BlockManifest

    manifest = BlockManifest.model_validate(
        {"type": "fastpath/rfdetr_instance_segmentation@v1", "name": "s", "images": "$inputs.image",
         "model_id": "m/1", "cuda_graphs": text}
    )
    assert manifest.cuda_graphs is expected
    assert FastpathOptions(cuda_graphs=text).cuda_graphs is expected
    with pytest.raises(InvalidOptionError, match="cuda_graphs"):
        FastpathOptions(cuda_graphs="maybe")


def test_threshold_values_are_validated_naming_the_field():
    names = ["alpha", "b"]
    with pytest.raises(ValueError, match=r"per_class_confidence\['alpha'\].*'abc'"):
        resolve_threshold("default", None, {"alpha": "abc"}, names)
    with pytest.raises(ValueError, match=r"per_class_confidence\['alpha'\]"):
        resolve_threshold("default", None, {"alpha": 1.5}, names)
    with pytest.raises(ValueError, match="per_class_confidence"):
        resolve_threshold("default", None, ["alpha"], names)
    with pytest.raises(ValueError, match="custom_confidence"):
        resolve_threshold("custom", "high", None, names)
    assert float(resolve_threshold("default", None, {"alpha": "0.5"}, names)[0]) == pytest.approx(0.5)
