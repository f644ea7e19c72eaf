"""Stage selection on a CPU-only machine: fast choices fall back to the reference with a reason."""

from __future__ import annotations

import logging

import pytest
import torch

from inference_fastpath.adapters.model_loading import LoadedModel, ModelKey
from inference_fastpath.adapters.options import FastpathOptions
from inference_fastpath.adapters.selection import select_postprocess, select_preprocess


class _FakeModel:
    class_names = ["a", "b"]
    _inference_config = None
    _classes_re_mapping = None


@pytest.fixture
def loaded_on_cpu() -> LoadedModel:
    return LoadedModel(
        key=ModelKey("fake", None, "cpu"), model=_FakeModel(), backend="torch",
        class_names=("a", "b"), device=torch.device("cpu"),
    )


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_preprocess_without_cuda_falls_back_with_reason(loaded_on_cpu, monkeypatch, choice):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    stage, selection = select_preprocess(FastpathOptions(preprocess=choice), loaded_on_cpu)
    assert stage.name == "reference" and selection.selected == "reference"
    assert "CUDA" in selection.fallback_reason


def test_auto_ignores_the_interpreter(loaded_on_cpu, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, selection = select_postprocess(FastpathOptions(postprocess="auto"), loaded_on_cpu)
    assert selection.selected == "reference" and "CUDA" in selection.fallback_reason


def test_reference_choices_have_no_fallback_reason(loaded_on_cpu):
    _, pre = select_preprocess(FastpathOptions(preprocess="reference"), loaded_on_cpu)
    _, post = select_postprocess(FastpathOptions(postprocess="reference"), loaded_on_cpu)
    assert pre.fallback_reason is None and post.fallback_reason is None


def test_block_logs_each_stage_choice_once_per_step(loaded_on_cpu, caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from inference_fastpath.adapters.runner import SegmentationRunner
    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import RFDetrInstanceSegmentationBlockV1

    runner = SegmentationRunner(loaded_on_cpu, FastpathOptions(postprocess="fused", preprocess="reference"))
    block = RFDetrInstanceSegmentationBlockV1()
    block._workflow_step_name = "seg"
    with caplog.at_level(logging.INFO, logger="inference_fastpath"):
        block._log_stage_choices_once(runner)
        block._log_stage_choices_once(runner)
    fallbacks = [r for r in caplog.records if "postprocess=fused resolved to reference" in r.getMessage()]
    assert len(fallbacks) == 1 and "step seg" in fallbacks[0].getMessage()
