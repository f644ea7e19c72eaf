"""The plugin loads through WORKFLOWS_PLUGINS and the builder sees every option with its allowed values."""

from __future__ import annotations

import pytest

from inference_fastpath.adapters.options import ALLOWED_VALUES

BLOCK_TYPE = "fastpath/rfdetr_instance_segmentation@v1"
OPTIONS = {
    "preprocess": ["auto", "triton", "reference"],
    "engine": ["auto", "tensorrt", "torch", "onnx"],
    "postprocess": ["auto", "fused", "reference"],
    "pipeline_depth": [1, 2],
    "mask_output": ["compact", "dense", "rle"],
    "precision": ["fp32", "fp16", "bf16"],
}


@pytest.fixture(scope="module")
def described_block():
    from inference.core.interfaces.http.handlers.workflows import handle_describe_workflows_blocks_request

    description = handle_describe_workflows_blocks_request()
    matching = [b for b in description.blocks if b.manifest_type_identifier == BLOCK_TYPE]
    assert len(matching) == 1, "our block is not listed by the server's describe handler"
    return matching[0]


def test_plugin_module_exposes_the_workflows_interface():
    import inference_fastpath

    blocks = inference_fastpath.load_blocks()
    assert [b.get_manifest().model_fields["type"].annotation.__args__[0] for b in blocks] == [
        BLOCK_TYPE, "fastpath/mask_visualization@v1"]
    # no initializer of ours: the key comes from the runtime (the request's), never from our env lookup
    assert not hasattr(inference_fastpath, "REGISTERED_INITIALIZERS")


def test_blocks_loader_finds_our_block_through_the_environment_variable():
    from inference.core.workflows.execution_engine.introspection.blocks_loader import (
        describe_available_blocks,
    )

    blocks = describe_available_blocks(dynamic_blocks=[])
    ours = [b for b in blocks.blocks if b.manifest_type_identifier == BLOCK_TYPE]
    assert ours and ours[0].block_source == "inference_fastpath"


def test_schema_lists_every_option_with_allowed_values_and_ui_metadata(described_block):
    properties = described_block.block_schema["properties"]
    for name, allowed in OPTIONS.items():
        assert _enum_of(properties[name]) == allowed, name
        assert properties[name].get("additional_section") is True, name
        assert set(properties[name]["values_metadata"]) == {str(v) for v in allowed}, name
        assert all(meta["name"] and meta["description"] for meta in properties[name]["values_metadata"].values())
        assert properties[name]["description"]
    assert "boolean" in [v.get("type") for v in properties["cuda_graphs"].get("anyOf", [properties["cuda_graphs"]])]
    assert properties["cuda_graphs"]["default"] is True
    assert properties["cuda_graphs"]["relevant_for"]["engine"]["values"] == ["auto", "tensorrt", "torch"]
    assert set(OPTIONS) <= set(ALLOWED_VALUES)
    for name in ("images", "model_id", "confidence_mode", "custom_confidence", "class_filter",
                 "max_detections", "per_class_confidence"):
        assert name in properties, name


def _enum_of(schema: dict) -> list:
    if "enum" in schema:
        return schema["enum"]
    return next(option["enum"] for option in schema["anyOf"] if "enum" in option)


def _accepts_selector(schema: dict) -> bool:
    # Workflows selectors appear in the schema as a `reference` string matching `$inputs.*`/`$steps.*`.
    return any(option.get("reference") is True and "$inputs" in option.get("pattern", "")
               for option in schema.get("anyOf", []))


def test_runtime_switchable_options_accept_selectors_and_fixed_ones_do_not(described_block):
    properties = described_block.block_schema["properties"]
    for name in ("preprocess", "engine", "postprocess", "precision", "cuda_graphs"):
        assert "anyOf" in properties[name] and _accepts_selector(properties[name]), name
    for name in ("pipeline_depth", "mask_output"):
        assert "anyOf" not in properties[name], name


def test_selector_for_pipeline_depth_is_rejected_with_a_clear_message():
    import pydantic

    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BlockManifest

    with pytest.raises(pydantic.ValidationError) as error:
        BlockManifest(type=BLOCK_TYPE, name="s", images="$inputs.image", model_id="m", pipeline_depth="$inputs.depth")
    assert "fixed when the workflow is compiled" in str(error.value) and "pipeline_depth" in str(error.value)


def test_outputs_follow_the_mask_output_option(described_block):
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BlockManifest

    kinds = {o.name: [k.name for k in o.kind] for o in described_block.outputs_manifest}
    assert set(kinds["predictions"]) == {"instance_segmentation_prediction", "rle_instance_segmentation_prediction"}
    compact = BlockManifest(type=BLOCK_TYPE, name="s", images="$inputs.image", model_id="m")
    dense = BlockManifest(type=BLOCK_TYPE, name="s", images="$inputs.image", model_id="m", mask_output="dense")
    rle = BlockManifest(type=BLOCK_TYPE, name="s", images="$inputs.image", model_id="m", mask_output="rle")
    assert compact.mask_output == "compact"
    assert [k.name for k in compact.get_actual_outputs()[1].kind] == ["instance_segmentation_prediction"]
    assert [k.name for k in dense.get_actual_outputs()[1].kind] == ["instance_segmentation_prediction"]
    # the RLE output carries its masks in `mask` as well: both kinds, as the stock v4 block declares
    assert [k.name for k in rle.get_actual_outputs()[1].kind] == [
        "rle_instance_segmentation_prediction", "instance_segmentation_prediction"]
