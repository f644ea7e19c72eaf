"""`fastpath/rfdetr_instance_segmentation@v1`: RF-DETR instance segmentation with switchable fast stages.

Inputs mirror the stock `roboflow_core/roboflow_instance_segmentation_model@v3` block where they matter
for RF-DETR; every optimization is a per-block option shown in the builder's additional section.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Dict, List, Literal, Optional, Type, Union

from pydantic import ConfigDict, Field, PositiveInt, field_validator, model_validator

from inference.core.workflows.execution_engine.entities.base import (
    Batch,
    OutputDefinition,
    WorkflowImageData,
)
from inference.core.workflows.execution_engine.entities.types import (
    BOOLEAN_KIND,
    DICTIONARY_KIND,
    FLOAT_ZERO_TO_ONE_KIND,
    IMAGE_KIND,
    INFERENCE_ID_KIND,
    INSTANCE_SEGMENTATION_PREDICTION_KIND,
    INTEGER_KIND,
    LIST_OF_VALUES_KIND,
    RLE_INSTANCE_SEGMENTATION_PREDICTION_KIND,
    ROBOFLOW_MODEL_ID_KIND,
    STRING_KIND,
    FloatZeroToOne,
    ImageInputField,
    Selector,
)
from inference.core.workflows.errors import ClientCausedStepExecutionError
from inference.core.workflows.prototypes.block import (
    BlockResult,
    WorkflowBlock,
    WorkflowBlockManifest,
)

from inference_fastpath.adapters.block_output import tag_source_frame
from inference_fastpath.adapters.model_access import LocalPackagesRefused
from inference_fastpath.adapters.model_loading import ModelLoadingError
from inference_fastpath.adapters.device_placement import check_device_value
from inference_fastpath.adapters.options import FastpathOptions, InvalidOptionError
from inference_fastpath.adapters.runner import RUNNERS, SegmentationRunner
from inference_fastpath.adapters.scheduling.pipeline_glue import (
    StreamPipelinedStep,
    declare_step_depth,
    per_key_outputs,
)
from inference_fastpath.adapters.step_inputs import StepInputs

LOGGER = logging.getLogger("inference_fastpath")

BLOCK_TYPE = "fastpath/rfdetr_instance_segmentation@v1"

LONG_DESCRIPTION = """
Run an RF-DETR instance-segmentation model (a Roboflow model id or a local inference-models package
directory: TensorRT, torch or ONNX) with the fast stages of inference-fastpath.

The outputs are the same as those of the stock Instance Segmentation Model block, so annotators,
trackers and sinks consume them unchanged. Each optimization can be switched on or off per block in
the additional settings; a fast stage that cannot run on this machine or model falls back to the
reference stage and the reason is logged once.
"""

ADDITIONAL = {"additional_section": True}


def _choice(name: str, description: str) -> Dict[str, str]:
    return {"name": name, "description": description}


class BlockManifest(WorkflowBlockManifest):
    model_config = ConfigDict(
        json_schema_extra={
            "name": "RF-DETR Instance Segmentation (Fastpath)",
            "version": "v1",
            "short_description": "RF-DETR instance segmentation with GPU-fused stages for video.",
            "long_description": LONG_DESCRIPTION,
            "license": "Apache-2.0",
            "block_type": "model",
            "search_keywords": ["rfdetr", "rf-detr", "segmentation", "fastpath", "tensorrt", "triton"],
            "ui_manifest": {
                "section": "model",
                "icon": "far fa-bolt",
                "blockPriority": 2,
                "inference": True,
                "needsGPU": False,
            },
        },
        protected_namespaces=(),
    )
    type: Literal["fastpath/rfdetr_instance_segmentation@v1"]
    images: Selector(kind=[IMAGE_KIND]) = ImageInputField
    model_id: Union[Selector(kind=[ROBOFLOW_MODEL_ID_KIND]), str] = Field(
        title="Model",
        description="Roboflow model id (e.g. `my-project/3`) or the path of a local inference-models "
        "RF-DETR instance-segmentation package directory.",
        examples=["my-project/3", "/models/rfdetr-seg-nano", "$inputs.model"],
    )
    confidence_mode: Union[Literal["best", "default", "custom"], Selector(kind=[STRING_KIND])] = Field(
        default="best",
        description="How confidence thresholds are determined (as in the stock block).",
        json_schema_extra={
            "always_visible": True,
            "values_metadata": {
                "best": _choice("Best (Recommended)", "Per-class thresholds from model evaluation when the package has them, else the model default."),
                "default": _choice("Default", "The model's built-in default threshold."),
                "custom": _choice("Custom", "The threshold given in Custom Confidence."),
            },
        },
    )
    custom_confidence: Union[Optional[FloatZeroToOne], Selector(kind=[FLOAT_ZERO_TO_ONE_KIND])] = Field(
        default=0.4,
        description="Confidence threshold used when the mode is `custom`.",
        examples=[0.3, "$inputs.confidence"],
        json_schema_extra={"relevant_for": {"confidence_mode": {"values": ["custom"], "required": True}}},
    )
    per_class_confidence: Union[Optional[Dict[str, FloatZeroToOne]], Selector(kind=[DICTIONARY_KIND])] = Field(
        default=None,
        description="Optional thresholds per class name (e.g. {\"car\": 0.6}); they override the mode's "
        "threshold for the listed classes.",
        examples=[{"car": 0.6, "person": 0.3}, "$inputs.per_class_confidence"],
    )
    class_filter: Union[Optional[List[str]], Selector(kind=[LIST_OF_VALUES_KIND])] = Field(
        default=None,
        description="List of accepted classes. Classes must exist in the model's training set.",
        examples=[["a", "b"], "$inputs.class_filter"],
    )
    max_detections: Union[PositiveInt, Selector(kind=[INTEGER_KIND])] = Field(
        default=300,
        description="Maximum number of detections to return per image.",
        examples=[300, "$inputs.max_detections"],
    )
    mask_output: Literal["compact", "dense", "rle"] = Field(
        default="compact",
        description="How masks travel to the next blocks. `compact`: supervision CompactMask (each mask "
        "stored as runs of its own box, never a full frame; every stock block reads it like dense masks). "
        "`dense`: a full-frame boolean array per detection. `rle`: COCO RLE in data['rle_mask'] "
        "(`rle_instance_segmentation_prediction`), with the same masks as a CompactMask in `mask`.",
        json_schema_extra={
            "values_metadata": {
                "compact": _choice("Compact masks (Recommended)", "supervision CompactMask: per-box runs, no full-frame arrays."),
                "dense": _choice("Dense masks", "sv.Detections with a full-frame boolean mask per detection."),
                "rle": _choice("RLE masks", "COCO RLE in data['rle_mask'] plus a CompactMask in mask; serialises as RLE."),
            },
            **ADDITIONAL,
        },
    )
    preprocess: Union[Literal["auto", "triton", "reference"], Selector(kind=[STRING_KIND])] = Field(
        default="auto",
        description="Image preprocessing implementation.",
        json_schema_extra={
            "values_metadata": {
                "auto": _choice("Auto", "Triton on a CUDA GPU, the reference path otherwise."),
                "triton": _choice("Triton (GPU)", "One fused GPU pass: PIL-exact resize, BGR->RGB, normalisation into the engine input."),
                "reference": _choice("Reference", "inference-models' PIL-based preprocessing on the CPU."),
            },
            **ADDITIONAL,
        },
    )
    engine: Union[Literal["auto", "tensorrt", "torch", "onnx"], Selector(kind=[STRING_KIND])] = Field(
        default="auto",
        description="Inference engine for the model package.",
        json_schema_extra={
            "values_metadata": {
                "auto": _choice("Auto", "TensorRT for TensorRT packages, torch on CUDA for torch packages, else what runs here."),
                "tensorrt": _choice("TensorRT", "A TensorRT plan package (TensorRT 10)."),
                "torch": _choice("PyTorch", "The torch weights package."),
                "onnx": _choice("ONNX Runtime", "The ONNX package; the portable fallback."),
            },
            **ADDITIONAL,
        },
    )
    cuda_graphs: Union[bool, Selector(kind=[BOOLEAN_KIND])] = Field(
        default=True,
        description="Capture the engine, the fused postprocess and the Triton preprocess launches in CUDA graphs "
        "once per shape and replay them per frame (GPU only; falls back to eager execution with a logged reason "
        "when capture is impossible). With the torch engine, partial batches replay the graph of a padded size.",
        json_schema_extra={
            "relevant_for": {"engine": {"values": ["auto", "tensorrt", "torch"], "required": False}},
            **ADDITIONAL,
        },
    )
    precision: Union[Literal["fp32", "fp16", "bf16"], Selector(kind=[STRING_KIND])] = Field(
        default="fp32",
        description="Compute precision of the torch engine (TensorRT/ONNX packages keep their own).",
        json_schema_extra={
            "values_metadata": {
                "fp32": _choice("FP32", "Exact reference numerics."),
                "fp16": _choice("FP16", "Half precision; detections match FP32 closely, not bit-exactly."),
                "bf16": _choice("BF16", "bfloat16 autocast."),
            },
            "relevant_for": {"engine": {"values": ["auto", "torch"], "required": False}},
            **ADDITIONAL,
        },
    )
    postprocess: Union[Literal["auto", "fused", "reference"], Selector(kind=[STRING_KIND])] = Field(
        default="auto",
        description="Postprocessing implementation (scores, boxes, masks).",
        json_schema_extra={
            "values_metadata": {
                "auto": _choice("Auto", "Fused Triton kernels on a CUDA GPU, the reference path otherwise."),
                "fused": _choice("Fused (GPU)", "Top-k, boxes and masks in fused kernels; one copy to the host per frame."),
                "reference": _choice("Reference", "inference-models' postprocessing."),
            },
            **ADDITIONAL,
        },
    )
    pipeline_depth: Literal[1, 2] = Field(
        default=1,
        description="1: each frame is finished before the next starts. 2: frame N's CPU work overlaps "
        "frame N+1's GPU work inside InferencePipeline (results stay paired with their frames).",
        json_schema_extra={
            "values_metadata": {
                "1": _choice("Synchronous", "One frame at a time."),
                "2": _choice("Pipelined (depth 2)", "Overlap CPU finalisation with the next frame's GPU work."),
            },
            **ADDITIONAL,
        },
    )

    downstream_overlap: bool = Field(
        default=False,
        description="With pipeline_depth 2 inside InferencePipeline: each run returns the previous frame's "
        "predictions together with that frame on the `image` output, so the steps after this one (visualizations, "
        "trackers, sinks) work on frame N-1 while the GPU runs frame N. Wire those steps to "
        "`$steps.<this step>.image`, not `$inputs.image`. Results and their pairing with video frames are unchanged; "
        "HTTP requests are never delayed.",
        json_schema_extra={
            "relevant_for": {"pipeline_depth": {"values": [2], "required": True}},
            **ADDITIONAL,
        },
    )

    device: Union[str, Selector(kind=[STRING_KIND])] = Field(
        default="auto",
        description="Device of every stage: 'auto' (this process's current GPU, else the CPU), 'cuda:N' (the N-th "
        "GPU this process sees) or 'cpu'. A GPU the process cannot see is an error, never a silent fallback.",
        examples=["auto", "cuda:0", "cuda:1", "cpu"],
        json_schema_extra={**ADDITIONAL},
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device_format(cls, value):
        if isinstance(value, str) and not value.startswith("$"):
            check_device_value(value)
        return value

    @field_validator("pipeline_depth", "mask_output", "downstream_overlap", mode="before")
    @classmethod
    def _fixed_at_pipeline_start(cls, value, info):
        if isinstance(value, str) and value.startswith("$"):
            raise ValueError(
                f"`{info.field_name}` is fixed when the workflow is compiled (it shapes the pipeline / the "
                f"output kind) and cannot come from a selector such as {value!r}; write the value itself."
            )
        return value

    @model_validator(mode="after")
    def _check_custom_confidence(self) -> "BlockManifest":
        if self.confidence_mode == "custom" and self.custom_confidence is None:
            raise ValueError("`custom_confidence` is required when `confidence_mode` is 'custom'")
        if self.downstream_overlap and self.pipeline_depth != 2:
            raise ValueError("`downstream_overlap` needs `pipeline_depth` 2 (it overlaps the steps after this one "
                             f"with the next frame's GPU work); got pipeline_depth={self.pipeline_depth}")
        declare_step_depth(self.name, self.pipeline_depth, self.downstream_overlap)
        return self

    @classmethod
    def get_parameters_accepting_batches(cls) -> List[str]:
        return ["images"]

    @classmethod
    def describe_outputs(cls) -> List[OutputDefinition]:
        return [
            OutputDefinition(name="inference_id", kind=[INFERENCE_ID_KIND]),
            OutputDefinition(
                name="predictions",
                kind=[INSTANCE_SEGMENTATION_PREDICTION_KIND, RLE_INSTANCE_SEGMENTATION_PREDICTION_KIND],
            ),
            OutputDefinition(name="model_id", kind=[ROBOFLOW_MODEL_ID_KIND]),
            OutputDefinition(name="image", kind=[IMAGE_KIND]),
        ]

    def get_actual_outputs(self) -> List[OutputDefinition]:
        # the RLE output also carries its masks in `mask`: it satisfies both kinds, as stock v4 declares
        kinds = [INSTANCE_SEGMENTATION_PREDICTION_KIND]
        if self.mask_output == "rle":
            kinds = [RLE_INSTANCE_SEGMENTATION_PREDICTION_KIND, INSTANCE_SEGMENTATION_PREDICTION_KIND]
        return [
            OutputDefinition(name="inference_id", kind=[INFERENCE_ID_KIND]),
            OutputDefinition(name="predictions", kind=kinds),
            OutputDefinition(name="model_id", kind=[ROBOFLOW_MODEL_ID_KIND]),
            OutputDefinition(name="image", kind=[IMAGE_KIND]),
        ]

    @classmethod
    def get_execution_engine_compatibility(cls) -> Optional[str]:
        return ">=1.3.0,<2.0.0"


# The request's API key as the stock model blocks receive it: the HTTP request's key on the server,
# the pipeline's key in InferencePipeline (see adapters/model_access.py).
API_KEY_PARAMETER = "workflows_core.api_key"
OUTPUT_KEYS = ("inference_id", "predictions", "model_id")
# The frame the predictions belong to: the input image, or with downstream overlap the previous run's.
IMAGE_OUTPUT_KEY = "image"


class RFDetrInstanceSegmentationBlockV1(StreamPipelinedStep, WorkflowBlock):
    """RF-DETR instance segmentation with switchable fast stages; outputs as the stock v3 block.

    Example:
        >>> block = RFDetrInstanceSegmentationBlockV1(**{"workflows_core.api_key": None})  # doctest: +SKIP
        >>> block.run(images=[image], model_id="my-project/3", mask_output="rle")[0]["predictions"]  # doctest: +SKIP
    """

    def __init__(self, **init_parameters: Any) -> None:
        self._api_key: Optional[str] = init_parameters.get(API_KEY_PARAMETER)
        self._logged_choices: set = set()

    @classmethod
    def get_init_parameters(cls) -> List[str]:
        return [API_KEY_PARAMETER]

    @classmethod
    def get_manifest(cls) -> Type[WorkflowBlockManifest]:
        return BlockManifest

    def run(
        self,
        images: Batch[WorkflowImageData],
        model_id: str,
        confidence_mode: str = "best",
        custom_confidence: Optional[float] = 0.4,
        per_class_confidence: Optional[Dict[str, float]] = None,
        class_filter: Optional[List[str]] = None,
        max_detections: int = 300,
        mask_output: str = "compact",
        preprocess: str = "auto",
        engine: str = "auto",
        cuda_graphs: bool = True,
        precision: str = "fp32",
        postprocess: str = "auto",
        pipeline_depth: int = 1,
        downstream_overlap: bool = False,
        device: str = "auto",
    ) -> BlockResult:
        with self._client_errors():
            options = FastpathOptions(preprocess=preprocess, engine=engine, cuda_graphs=cuda_graphs,
                                      postprocess=postprocess, precision=precision, mask_output=mask_output,
                                      pipeline_depth=pipeline_depth, device=device)
            inputs = StepInputs.from_block(
                model_id=model_id, confidence_mode=confidence_mode, custom_confidence=custom_confidence,
                per_class_confidence=per_class_confidence, class_filter=class_filter,
                max_detections=max_detections, mask_output=mask_output,
            )
            runner = RUNNERS.get(model_id=model_id, options=options, api_key=self._api_key)
            self._log_stage_choices_once(runner)
            results = runner.submit(images, inputs, self.scheduler(pipeline_depth), step_name=self._step_name)
            delivery = self.previous_frame_delivery(OUTPUT_KEYS, IMAGE_OUTPUT_KEY)
            if delivery is not None:
                delivered = delivery.exchange(images, results)
                for outputs in delivered:
                    tag_source_frame(outputs["predictions"], outputs[IMAGE_OUTPUT_KEY])
                return delivered
        return [{**outputs, IMAGE_OUTPUT_KEY: image}
                for outputs, image in zip(per_key_outputs(results, OUTPUT_KEYS), images)]

    @property
    def _step_name(self) -> str:
        return getattr(self, "_workflow_step_name", None) or BLOCK_TYPE

    @contextmanager
    def _client_errors(self):
        """Client mistakes (bad option value from a selector, a refused or unknown model, bad thresholds)
        surface as the runtime's client error, so the HTTP server answers 4xx naming the step and cause."""
        try:
            yield
        except (InvalidOptionError, ModelLoadingError, LocalPackagesRefused, ValueError) as error:
            raise ClientCausedStepExecutionError(
                block_id=self._step_name,
                status_code=getattr(error, "status_code", 400),
                public_message=str(error),
                context="workflow_execution | step_execution | fastpath_setup",
                inner_error=error,
            ) from error

    def _log_stage_choices_once(self, runner: SegmentationRunner) -> None:
        for choice in runner.choices:
            key = (id(runner), choice)
            if key in self._logged_choices:
                continue
            self._logged_choices.add(key)
            if choice.fallback_reason:
                LOGGER.warning("step %s: %s=%s resolved to %s: %s", self._step_name, choice.stage,
                               choice.requested, choice.selected, choice.fallback_reason)
            else:
                LOGGER.info("step %s: %s=%s -> %s", self._step_name, choice.stage, choice.requested, choice.selected)
            if choice.note:
                LOGGER.warning("step %s: %s=%s: %s", self._step_name, choice.stage, choice.selected, choice.note)
