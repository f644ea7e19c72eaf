"""The `device` option: its resolution to one indexed device, and every stage run on that device (CPU)."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inference_fastpath.adapters import runner as runner_module
from inference_fastpath.adapters.contracts import PostprocessRequest, PreprocessedBatch, RawOutputs
from inference_fastpath.adapters.device_placement import DevicePlacementError, resolve_device
from inference_fastpath.adapters.options import FastpathOptions, InvalidOptionError


@pytest.mark.parametrize("requested, count, current, expected", [
    ("auto", 0, None, torch.device("cpu")),
    ("cpu", 4, 0, torch.device("cpu")),
    ("auto", 2, 1, torch.device("cuda", 1)),  # the process's current GPU, not a fixed cuda:0
    ("cuda", 2, 0, torch.device("cuda", 0)),
    ("cuda:1", 2, 0, torch.device("cuda", 1)),
    ("cuda:7", 8, 0, torch.device("cuda", 7)),
    (" cuda:0 ", 1, 0, torch.device("cuda", 0)),
])
def test_resolution(requested, count, current, expected):
    assert resolve_device(requested, cuda_count=count, current=current) == expected


@pytest.mark.parametrize("requested, count, message", [
    ("cuda:2", 2, "sees 2 CUDA device(s), cuda:0 to cuda:1"),
    ("cuda:0", 0, "sees no CUDA device"),
    ("cuda", 0, "sees no CUDA device"),
    ("gpu", 1, "Invalid value 'gpu' for option `device`"),
    ("cuda:-1", 1, "Invalid value 'cuda:-1'"),
    ("cuda:1,2", 4, "Invalid value 'cuda:1,2'"),
])
def test_a_device_this_process_cannot_use_is_an_error_naming_it(requested, count, message):
    with pytest.raises(DevicePlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(requested, cuda_count=count, current=0)


def test_options_validate_the_device_value():
    assert FastpathOptions(device="cuda:3").device == "cuda:3"
    assert FastpathOptions().device == "auto"
    with pytest.raises(InvalidOptionError, match="`device`"):
        FastpathOptions(device="cuda1")


def test_manifest_rejects_a_malformed_device_and_accepts_a_selector():
    from pydantic import ValidationError

    from inference_fastpath.blocks.rfdetr_instance_segmentation_v1 import BLOCK_TYPE, BlockManifest

    common = dict(type=BLOCK_TYPE, name="s", images="$inputs.image", model_id="m")
    assert BlockManifest(**common, device="cuda:1").device == "cuda:1"
    assert BlockManifest(**common, device="$inputs.device").device == "$inputs.device"
    with pytest.raises(ValidationError, match="option `device`"):
        BlockManifest(**common, device="GPU 1")


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records which device is current while stages run."""

    def __init__(self):
        self.current = []

    def __call__(self, device):
        @contextlib.contextmanager
        def entered():
            self.current.append(device)
            try:
                yield
            finally:
                self.current.pop()

        return entered()

    @property
    def now(self):
        return self.current[-1] if self.current else None


def test_every_stage_is_built_and_run_on_the_steps_device(monkeypatch):
    """A runner for cuda:1 builds its stages and runs preprocess, engine and postprocess with cuda:1
    current (Triton launches, graph captures and pinned buffers follow the current device)."""
    recorder = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # another GPU is current
    seen = {}
    target = torch.device("cuda", 1)

    def preprocess(frames, input_buffer=None):
        seen["preprocess"] = recorder.now
        return PreprocessedBatch(tensor=torch.zeros(1), metadata=[None])

    def engine(batch):
        seen["engine"] = recorder.now
        return RawOutputs(boxes=torch.zeros(1), logits=torch.zeros(1), masks=torch.zeros(1))

    def postprocess(raw, metadata, request):
        seen["postprocess"] = recorder.now
        return []

    def select_stages(options, loaded):
        seen["built"] = recorder.now
        engine.input_buffer = None
        return SimpleNamespace(preprocess=preprocess, engine=engine, postprocess=postprocess, choices=())

    monkeypatch.setattr(runner_module, "select_stages", select_stages)
    loaded = SimpleNamespace(device=target, class_names=("a",), model=None)
    runner = runner_module.SegmentationRunner(loaded, FastpathOptions(device="cuda:1"))
    runner.complete(runner.launch([np.zeros((4, 4, 3), np.uint8)]), PostprocessRequest(0.5, None))
    assert seen == {"built": target, "preprocess": target, "engine": target, "postprocess": target}
    assert recorder.now is None  # and nothing is left current afterwards


def test_runner_cache_loads_the_model_on_the_resolved_device(monkeypatch):
    asked = []

    def get(model_id, engine, device, api_key=None):
        asked.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner_module.MODEL_REGISTRY, "get", get)
    with pytest.raises(RuntimeError, match="stop here"):
        runner_module.RUNNERS.get("m", FastpathOptions(device="cpu"))
    assert asked == ["cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(DevicePlacementError, match="sees no CUDA device"):
            runner_module.RUNNERS.get("m", FastpathOptions(device="cuda:0"))


def test_the_current_device_is_left_alone(monkeypatch):
    from inference_fastpath.adapters.device_placement import on_device

    recorder = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with on_device(torch.device("cuda", 1)):
        assert recorder.now is None
    with on_device(torch.device("cuda", 0)):
        assert recorder.now == torch.device("cuda", 0)



def test_auto_and_the_device_it_resolves_to_share_one_runner(monkeypatch):
    loaded = SimpleNamespace(key="k", device=torch.device("cpu"), class_names=("a",), model=None)
    monkeypatch.setattr(runner_module.MODEL_REGISTRY, "get", lambda **kwargs: loaded)
    monkeypatch.setattr(runner_module, "select_stages", lambda options, loaded: SimpleNamespace(
        preprocess=None, engine=None, postprocess=None, choices=()))
    cache = runner_module.RunnerCache()
    resolved = str(resolve_device("auto"))  # cpu here, cuda:0 on a GPU host
    assert cache.get("m", FastpathOptions(device="auto")) is cache.get("m", FastpathOptions(device=resolved))
    assert len(cache.runners()) == 1 and cache.runners()[0].options.device == resolved


def test_the_mask_visualization_takes_a_device_too():
    from pydantic import ValidationError

    from inference_fastpath.blocks.mask_visualization_v1 import BLOCK_TYPE, BlockManifest

    common = dict(type=BLOCK_TYPE, name="m", image="$inputs.image", predictions="$steps.s.predictions")
    assert BlockManifest(**common).device == "auto"
    assert BlockManifest(**common, device="cuda:2").device == "cuda:2"
    with pytest.raises(ValidationError, match="option `device`"):
        BlockManifest(**common, device="gpu:2")
