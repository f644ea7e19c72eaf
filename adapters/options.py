"""One typed, immutable options object per block step: it selects every stage of the adapter.

Built from the block manifest's values (``FastpathOptions.from_values``) and hashable, so it can key
caches. Validation errors name the offending field and list the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, get_args

from pydantic import TypeAdapter, ValidationError

from inference_fastpath.adapters.device_placement import check_device_value

PreprocessChoice = Literal["auto", "triton", "reference"]
EngineChoice = Literal["auto", "tensorrt", "torch", "onnx"]
PostprocessChoice = Literal["auto", "fused", "reference"]
PrecisionChoice = Literal["fp32", "fp16", "bf16"]
MaskOutputChoice = Literal["compact", "dense", "rle"]
PipelineDepth = Literal[1, 2]

ALLOWED_VALUES: Dict[str, Tuple[Any, ...]] = {
    "preprocess": get_args(PreprocessChoice),
    "engine": get_args(EngineChoice),
    "postprocess": get_args(PostprocessChoice),
    "precision": get_args(PrecisionChoice),
    "mask_output": get_args(MaskOutputChoice),
    "pipeline_depth": get_args(PipelineDepth),
}


_BOOL = TypeAdapter(bool)


class InvalidOptionError(ValueError):
    """An option value outside its allowed set; the message names the field."""


@dataclass(frozen=True)
class FastpathOptions:
    """The optimization options of one step; each selects one stage implementation.

    Example:
        >>> FastpathOptions(preprocess="reference", cuda_graphs="false").cuda_graphs
        False
    """

    preprocess: PreprocessChoice = "auto"
    engine: EngineChoice = "auto"
    cuda_graphs: bool = True
    postprocess: PostprocessChoice = "auto"
    precision: PrecisionChoice = "fp32"
    mask_output: MaskOutputChoice = "compact"
    pipeline_depth: PipelineDepth = 1
    device: str = "auto"  # adapters/device_placement.py: auto, cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        for name, allowed in ALLOWED_VALUES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidOptionError(
                    f"Invalid value {value!r} for option `{name}`: expected one of {list(allowed)}."
                )
        try:
            object.__setattr__(self, "device", check_device_value(self.device))
        except ValueError as error:
            raise InvalidOptionError(str(error)) from None
        if not isinstance(self.cuda_graphs, bool):
            # a selector hands the raw value over ("false" from $inputs); parse it as the manifest
            # parses the same text written into the workflow JSON
            try:
                object.__setattr__(self, "cuda_graphs", _BOOL.validate_python(self.cuda_graphs))
            except ValidationError:
                raise InvalidOptionError(
                    f"Invalid value {self.cuda_graphs!r} for option `cuda_graphs`: expected true or false."
                ) from None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "FastpathOptions":
        """Builds options from a mapping (e.g. block run kwargs), ignoring unrelated keys."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    def stage_options(self, device: Optional[str] = None) -> "FastpathOptions":
        """These options without the ones that select no stage (``mask_output`` is a per-run request,
        ``pipeline_depth`` a scheduling choice), with ``device`` the resolved one when given (so that
        ``auto`` and the device it stands for key one runner): what a runner is built from and cached by."""
        return replace(self, mask_output="compact", pipeline_depth=1, device=device or self.device)

    def describe(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
