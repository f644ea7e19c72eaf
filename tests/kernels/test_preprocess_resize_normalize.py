"""Fused Triton preprocess vs the real references: PIL (bytes), OpenCV (bytes) and inference-models'
RF-DETR ``pre_process_network_input`` (tensor + metadata).

Runs on a GPU when there is one, otherwise through the Triton interpreter on CPU tensors
(shapes are kept small for that).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without CUDA the kernels run through the Triton interpreter; the variable is read when
# @triton.jit decorates them, so it must be set before the kernel module is first imported.
_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import cv2  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from inference_models.models.auto_loaders.entities import PreProcessingOverrides  # noqa: E402
from inference_models.models.common.roboflow.model_packages import (  # noqa: E402
    ColorMode,
    Contrast,
    ContrastType,
    Grayscale,
    ImagePreProcessing,
    NetworkInputDefinition,
    ResizeMode,
    StaticCrop,
    TrainingInputSize,
)
from inference_models.models.rfdetr.pre_processing import pre_process_network_input  # noqa: E402
from PIL import Image  # noqa: E402

from inference_fastpath.adapters.preprocess.planning import PlanningError, plan_frame  # noqa: E402
from inference_fastpath.adapters.preprocess.triton import TritonPreprocess  # noqa: E402
from inference_fastpath.kernels.preprocess_resize_normalize import ResizeNormalizeOp, interpreter_active  # noqa: E402
from inference_fastpath.kernels.resize_coefficients import normalization_lut  # noqa: E402

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and not interpreter_active(),
    reason="kernels were imported before TRITON_INTERPRET=1 was set",
)

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
TARGET_HW = (24, 20)  # non-square so a swapped axis cannot pass
ATOL = 1e-6


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _to_device(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_cuda:
        torch.cuda.synchronize()
    return tensor.cpu()


def _normalized(u8_hwc: np.ndarray, swap_rb: bool = False) -> torch.Tensor:
    """The reference tail: optional BGR->RGB, TF.to_tensor (/255), TF.normalize."""
    if swap_rb:
        u8_hwc = u8_hwc[:, :, ::-1]
    return TF.normalize(TF.to_tensor(np.ascontiguousarray(u8_hwc)), MEAN, STD)


@pytest.fixture(scope="module", autouse=True)
def _restore_interpreter_env():
    """Triton's interpreter keeps reading TRITON_INTERPRET while it runs, so it stays set for this
    module; afterwards the previous value comes back so later test modules (stage selection,
    pipelines) keep their usual CPU path."""
    yield
    if _INTERPRET_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE


@pytest.fixture(scope="module")
def op() -> ResizeNormalizeOp:
    return ResizeNormalizeOp(DEVICE)


@pytest.fixture(scope="module")
def lut() -> torch.Tensor:
    return normalization_lut(MEAN, STD).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# Kernel: PIL resize + normalise
# ---------------------------------------------------------------------------------------------

# (src_h, src_w, dst_h, dst_w)
PIL_CASES = [
    pytest.param(50, 45, 20, 18, id="downscale-2.5x"),
    pytest.param(97, 20, 10, 6, id="downscale-odd-9.7x-3.3x"),
    pytest.param(7, 9, 24, 20, id="upscale"),
    pytest.param(33, 11, 16, 25, id="up-x-down-y"),
    pytest.param(21, 19, 40, 70, id="upscale-multi-tile"),
    pytest.param(12, 17, 12, 17, id="identity"),
    pytest.param(30, 17, 12, 17, id="width-unchanged"),
    pytest.param(12, 40, 12, 17, id="height-unchanged"),
    pytest.param(1, 1, 5, 7, id="src-1x1"),
    pytest.param(9, 7, 1, 1, id="dst-1x1"),
    pytest.param(1, 37, 8, 8, id="src-1xN"),
    pytest.param(37, 1, 8, 8, id="src-Nx1"),
    pytest.param(13, 9, 1, 16, id="dst-1xN"),
    pytest.param(2, 150, 8, 8, id="extreme-wide"),
    pytest.param(250, 2, 8, 8, id="extreme-tall-vertical-first"),
    pytest.param(130, 1, 5, 3, id="tall-column-vertical-first"),
]


@pytest.mark.parametrize("src_h, src_w, dst_h, dst_w", PIL_CASES)
def test_resize_bytes_match_pil(op, lut, src_h, src_w, dst_h, dst_w):
    image = _image(src_h, src_w)
    expected_u8 = np.array(Image.fromarray(image).resize((dst_w, dst_h), Image.BILINEAR))
    out = torch.empty((3, dst_h, dst_w), dtype=torch.float32, device=DEVICE)
    debug = torch.empty((dst_h, dst_w, 3), dtype=torch.uint8, device=DEVICE)

    op.resize_normalize(_to_device(image), out, lut, swap_rb=True, debug_u8=debug)

    np.testing.assert_array_equal(_host(debug).numpy(), expected_u8)
    torch.testing.assert_close(_host(out), _normalized(expected_u8, swap_rb=True), atol=ATOL, rtol=0)


@pytest.mark.parametrize("swap_rb", [False, True], ids=["keep-order", "swap-rb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_dtype_and_channel_order(op, swap_rb, dtype):
    image = _image(19, 23, seed=1)
    expected_u8 = np.array(Image.fromarray(image).resize((11, 9), Image.BILINEAR))
    out = torch.empty((3, 9, 11), dtype=dtype, device=DEVICE)

    op.resize_normalize(_to_device(image), out, normalization_lut(MEAN, STD, dtype=dtype).to(DEVICE), swap_rb=swap_rb)

    expected = _normalized(expected_u8, swap_rb=swap_rb)
    assert torch.equal(_host(out), expected.to(dtype))  # one RTNE rounding of the fp32 value


def test_static_crop_and_letterbox_box(op, lut):
    image = _image(20, 26, seed=2)
    crop = (3, 2, 20, 15)  # x, y, w, h
    box = (2, 5, 14, 10)  # resized image lands here; pad elsewhere
    out_h, out_w, pad = 18, 20, 114
    resized = np.array(Image.fromarray(image[2:17, 3:23]).resize((14, 10), Image.BILINEAR))
    expected_u8 = np.full((out_h, out_w, 3), pad, dtype=np.uint8)
    expected_u8[5:15, 2:16] = resized
    out = torch.empty((3, out_h, out_w), dtype=torch.float32, device=DEVICE)
    debug = torch.empty((out_h, out_w, 3), dtype=torch.uint8, device=DEVICE)

    op.resize_normalize(_to_device(image), out, lut, crop=crop, dst_box=box, pad_value=pad, debug_u8=debug)

    np.testing.assert_array_equal(_host(debug).numpy(), expected_u8)
    torch.testing.assert_close(_host(out), _normalized(expected_u8), atol=ATOL, rtol=0)


def test_batched_strided_source_into_output_view(op, lut):
    images = [_image(15, 13, seed=s) for s in range(3)]
    chw = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images]).to(DEVICE)
    src = chw.permute(0, 2, 3, 1)  # (N, H, W, 3) view of CHW memory: channel stride H*W
    buffer = torch.full((5, 3, 9, 8), float("nan"), device=DEVICE)

    op.resize_normalize(src, buffer[1:4], lut)

    result = _host(buffer)
    for index, image in enumerate(images):
        expected_u8 = np.array(Image.fromarray(image).resize((8, 9), Image.BILINEAR))
        torch.testing.assert_close(result[index + 1], _normalized(expected_u8), atol=ATOL, rtol=0)
    assert result[0].isnan().all() and result[4].isnan().all()


# ---------------------------------------------------------------------------------------------
# Kernel: OpenCV INTER_LINEAR into a canvas
# ---------------------------------------------------------------------------------------------

CV2_CASES = [
    pytest.param(31, 29, 16, 14, id="downscale"),
    pytest.param(7, 9, 20, 18, id="upscale"),
    pytest.param(40, 36, 20, 18, id="exact-half"),
    pytest.param(50, 8, 10, 40, id="down-y-up-x"),
    pytest.param(16, 16, 16, 16, id="identity"),
    pytest.param(1, 13, 5, 4, id="src-1xN"),
    pytest.param(13, 1, 4, 5, id="src-Nx1"),
    pytest.param(1, 1, 3, 3, id="src-1x1"),
]


@pytest.mark.parametrize("src_h, src_w, dst_h, dst_w", CV2_CASES)
def test_linear_canvas_bytes_match_opencv(op, src_h, src_w, dst_h, dst_w):
    image = _image(src_h, src_w, seed=3)
    top, left, pad = 2, 3, 127
    canvas = torch.zeros((dst_h + 3, dst_w + 5, 3), dtype=torch.uint8, device=DEVICE)
    expected = np.full((dst_h + 3, dst_w + 5, 3), pad, dtype=np.uint8)
    expected[top : top + dst_h, left : left + dst_w] = cv2.resize(image, (dst_w, dst_h))

    op.linear_resize_into_canvas(_to_device(image), canvas, box=(left, top, dst_w, dst_h), pad_value=pad)

    np.testing.assert_array_equal(_host(canvas).numpy(), expected)


# ---------------------------------------------------------------------------------------------
# Stage vs inference-models' RF-DETR pre_process_network_input
# ---------------------------------------------------------------------------------------------


def _network_input(
    mode: str = "stretch",
    dims=None,
    color: str = "rgb",
    padding_value=None,
    normalization=True,
    scaling_factor=255,
) -> NetworkInputDefinition:
    return NetworkInputDefinition(
        training_input_size=TrainingInputSize(height=TARGET_HW[0], width=TARGET_HW[1]),
        dataset_version_resize_dimensions=(
            None if dims is None else TrainingInputSize(height=dims[0], width=dims[1])
        ),
        dynamic_spatial_size_supported=False,
        color_mode=ColorMode(color),
        resize_mode=ResizeMode(mode),
        padding_value=padding_value,
        input_channels=3,
        scaling_factor=scaling_factor,
        normalization=(MEAN, STD) if normalization else None,
    )


def _static_crop(x_min=10, y_min=15, x_max=85, y_max=90) -> ImagePreProcessing:
    return ImagePreProcessing(
        **{"static-crop": StaticCrop(enabled=True, x_min=x_min, x_max=x_max, y_min=y_min, y_max=y_max)}
    )


def _assert_matches_reference(stage_kwargs: dict, frames, reference_frames=None, out=None):
    stage = TritonPreprocess(device=DEVICE, **stage_kwargs)
    assert stage.unsupported_reason(frames) is None
    batch = stage(frames, out=out)
    if batch.ready_event is not None:
        batch.ready_event.synchronize()
    expected, expected_meta = pre_process_network_input(
        list(reference_frames if reference_frames is not None else frames),
        stage_kwargs["image_pre_processing"],
        stage_kwargs["network_input"],
        torch.device("cpu"),
        input_color_format=stage_kwargs.get("input_color_format", "bgr"),
    )
    assert batch.metadata == expected_meta
    result = _host(batch.tensor)
    dtype = stage_kwargs.get("dtype", torch.float32)
    if dtype == torch.float32:
        torch.testing.assert_close(result, expected, atol=ATOL, rtol=0)
    else:
        assert torch.equal(result, expected.to(dtype))
    return batch


# Sizes mixed in one batch; the repeated size is staged back to back and shares a launch.
MIXED_SIZES = [(37, 53), (37, 53), (9, 41), (60, 17)]

MODE_CASES = [
    # Without dataset-version dimensions every mode collapses to one PIL stretch.
    pytest.param("stretch", None, id="stretch"),
    pytest.param("letterbox", None, id="letterbox-no-dims"),
    pytest.param("letterbox-reflect-edges", None, id="reflect-no-dims"),
    pytest.param("center-crop", None, id="center-crop-no-dims"),
    pytest.param("fit-longer-edge", None, id="fit-longer-edge-no-dims"),
    pytest.param("stretch", (30, 26), id="stretch-with-dims"),
    # cv2 dataset-version step, then the PIL stretch.
    pytest.param("letterbox", (30, 26), id="letterbox"),
    pytest.param("letterbox", (18, 40), id="letterbox-wide-canvas"),
    pytest.param("letterbox-reflect-edges", (30, 26), id="letterbox-reflect-edges"),
    pytest.param("center-crop", (30, 26), id="center-crop"),
    pytest.param("center-crop", (40, 44), id="center-crop-pads"),
    pytest.param("fit-longer-edge", (30, 26), id="fit-longer-edge"),
    pytest.param("fit-longer-edge", (18, 40), id="fit-longer-edge-wide"),
]


@pytest.mark.parametrize("mode, dims", MODE_CASES)
def test_stage_resize_modes_mixed_batch(mode, dims):
    frames = [_image(h, w, seed=i) for i, (h, w) in enumerate(MIXED_SIZES)]
    network_input = _network_input(mode, dims, padding_value=127)
    _assert_matches_reference(
        dict(network_input=network_input, image_pre_processing=ImagePreProcessing()), frames
    )


@pytest.mark.parametrize("mode, dims", [("stretch", None), ("letterbox", (30, 26)), ("center-crop", (16, 12))])
def test_stage_static_crop(mode, dims):
    frames = [_image(41, 33, seed=5), _image(20, 50, seed=6)]
    _assert_matches_reference(
        dict(network_input=_network_input(mode, dims, padding_value=255), image_pre_processing=_static_crop()),
        frames,
    )


@pytest.mark.parametrize("network_color", ["rgb", "bgr"])
@pytest.mark.parametrize("input_color", ["bgr", "rgb", None])
@pytest.mark.parametrize("mode, dims", [("stretch", None), ("letterbox", (30, 26))])
def test_stage_colour_orders(mode, dims, input_color, network_color):
    frames = [_image(15, 22, seed=7)]
    _assert_matches_reference(
        dict(
            network_input=_network_input(mode, dims, color=network_color),
            image_pre_processing=ImagePreProcessing(),
            input_color_format=input_color,
        ),
        frames,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stage_reduced_precision_output(dtype):
    frames = [_image(31, 18, seed=8), _image(12, 12, seed=9)]
    _assert_matches_reference(
        dict(network_input=_network_input(), image_pre_processing=ImagePreProcessing(), dtype=dtype), frames
    )


@pytest.mark.parametrize(
    "mode, dims",
    [("stretch", None), ("fit-longer-edge", (30, 26)), ("center-crop", (30, 26))],
)
def test_stage_one_pixel_and_extreme_frames(mode, dims):
    sizes = [(1, 1), (1, 30), (30, 1), (2, 90), (90, 2)]
    frames = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    _assert_matches_reference(
        dict(network_input=_network_input(mode, dims), image_pre_processing=ImagePreProcessing()), frames
    )


@pytest.mark.parametrize("normalization, scaling_factor", [(False, 255), (False, 127.5), (False, None)])
def test_stage_scaling_without_normalization(normalization, scaling_factor):
    network_input = _network_input(normalization=normalization, scaling_factor=scaling_factor)
    _assert_matches_reference(
        dict(network_input=network_input, image_pre_processing=ImagePreProcessing()), [_image(14, 19, seed=10)]
    )


def test_stage_tensor_frames_and_caller_buffer():
    base = [_image(17, 23, seed=11), _image(26, 14, seed=12), _image(17, 23, seed=13)]
    frames = [
        base[0][:, ::-1][:, ::-1],  # numpy view with negative strides twice (same pixels)
        _to_device(base[1]),  # device tensor, HWC
        _to_device(base[2]).permute(2, 0, 1),  # device tensor, CHW
        np.ascontiguousarray(base[0][:, :, ::-1])[:, :, ::-1],  # strided numpy view
    ]
    reference_frames = [base[0], base[1], base[2], base[0]]
    buffer = torch.full((6, 3, *TARGET_HW), float("nan"), device=DEVICE)
    out = buffer[1:5]
    batch = _assert_matches_reference(
        dict(network_input=_network_input("letterbox", (30, 26)), image_pre_processing=ImagePreProcessing()),
        frames,
        reference_frames,
        out=out,
    )
    assert batch.tensor.data_ptr() == out.data_ptr()
    assert (batch.ready_event is not None) == (DEVICE.type == "cuda")
    host = _host(buffer)
    assert host[0].isnan().all() and host[5].isnan().all()


def test_stage_reuses_its_buffer_across_calls():
    stage = TritonPreprocess(_network_input(), ImagePreProcessing(), DEVICE)
    first = [_image(20, 20, seed=14), _image(20, 20, seed=15)]
    second = [_image(11, 30, seed=16)]
    stage(first)
    batch = stage(second)
    expected, _ = pre_process_network_input(second, ImagePreProcessing(), _network_input(), torch.device("cpu"), "bgr")
    torch.testing.assert_close(_host(batch.tensor), expected, atol=ATOL, rtol=0)


def test_stage_batches_equal_frames_into_one_launch(monkeypatch):
    stage = TritonPreprocess(_network_input(), ImagePreProcessing(), DEVICE)
    launched = []
    original = stage._op.resize_normalize

    def spy(src, out, *args, **kwargs):
        launched.append(src.shape[0])
        return original(src, out, *args, **kwargs)

    monkeypatch.setattr(stage._op, "resize_normalize", spy)
    frames = [_image(20, 20, seed=17), _image(20, 20, seed=18), _image(11, 30, seed=19), _image(20, 20, seed=20)]
    batch = stage(frames)
    expected, _ = pre_process_network_input(frames, ImagePreProcessing(), _network_input(), torch.device("cpu"), "bgr")
    torch.testing.assert_close(_host(batch.tensor), expected, atol=ATOL, rtol=0)
    assert launched == [2, 1, 1]  # consecutive staged frames of one size share a launch


@pytest.mark.parametrize(
    "mode, dims, preprocessing, overrides",
    [
        ("stretch", None, ImagePreProcessing(), None),
        ("letterbox", (30, 26), _static_crop(), None),
        ("center-crop", (30, 26), _static_crop(0, 0, 50, 100), None),
        ("fit-longer-edge", (18, 40), _static_crop(), PreProcessingOverrides(disable_static_crop=True)),
    ],
)
def test_plan_metadata_matches_reference(mode, dims, preprocessing, overrides):
    network_input = _network_input(mode, dims, padding_value=127)
    for height, width in [(1, 1), (7, 300), (300, 7), (480, 640), (31, 30)]:
        image = _image(height, width)

        def reference():
            return pre_process_network_input(
                image, preprocessing, network_input, torch.device("cpu"), "bgr",
                pre_processing_overrides=overrides,
            )[1][0]

        try:
            plan = plan_frame(height, width, network_input, preprocessing, ColorMode.BGR, overrides)
        except PlanningError:
            # An empty static crop (1x1 frame): the stage declines via unsupported_reason and the
            # adapter runs the reference, which fails or pads a blank canvas depending on mode.
            continue
        assert plan.metadata == reference()


def test_unsupported_reasons():
    plain = TritonPreprocess(_network_input(), ImagePreProcessing(), DEVICE)
    good = _image(8, 8)
    assert plain.unsupported_reason([good]) is None
    assert plain.unsupported_reason([]) is not None
    assert plain.unsupported_reason([good.astype(np.float32)]) is not None
    assert plain.unsupported_reason([np.zeros((8, 8, 4), np.uint8)]) is not None
    assert plain.unsupported_reason([np.zeros((8, 8), np.uint8)]) is not None
    assert plain.unsupported_reason([torch.zeros((3, 8, 8))]) is not None  # float tensor

    grayscale = ImagePreProcessing(grayscale=Grayscale(enabled=True))
    contrast = ImagePreProcessing(
        contrast=Contrast(enabled=True, type=ContrastType.HISTOGRAM_EQUALIZATION)
    )
    assert TritonPreprocess(_network_input(), grayscale, DEVICE).unsupported_reason([good]) is not None
    assert TritonPreprocess(_network_input(), contrast, DEVICE).unsupported_reason([good]) is not None
    overridden = TritonPreprocess(
        _network_input(), grayscale, DEVICE, pre_processing_overrides=PreProcessingOverrides(disable_grayscale=True)
    )
    assert overridden.unsupported_reason([good]) is None
    # letterbox of a 1x30 frame into 30x26 scales its height to 0: the reference fails too
    letterbox = TritonPreprocess(_network_input("letterbox", (30, 26)), ImagePreProcessing(), DEVICE)
    assert letterbox.unsupported_reason([_image(1, 30)]) is not None
    with pytest.raises(ValueError):
        letterbox([_image(1, 30)])
