"""The demo network and its package files: RF-DETR-seg-nano from inference-models' own code with
seeded random weights, and the metadata files of an inference-models torch package.

Used by ``demo_model.py`` (the random, calibrated demo package) and by ``training/`` (the network
trained on synthetic scenes, whose frozen encoder must rebuild identically on any host).

    >>> from inference_fastpath.examples.demo_network import build_random_network
    >>> network = build_random_network(0, num_classes=6, portable_encoder=True)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

MODEL_TYPE = "rfdetr-seg-nano"
RESOLUTION = 312  # RF-DETR-seg-nano native input size (divisible by patch 12 x windows 1)
BOX_LOG_SCALE = math.log(3.5)  # boxes ~3.5x the 0.05 encoder anchors (~17% of the image side)
BOX_WEIGHT_STD = 0.025  # with unit-variance features (norm 16) -> ~0.4 std in log-size

_INFERENCE_CONFIG: Dict[str, Any] = {
    "network_input": {
        "training_input_size": {"height": RESOLUTION, "width": RESOLUTION},
        "dynamic_spatial_size_supported": False,
        "color_mode": "rgb",  # trained-RF-DETR convention: BGR video frames are swapped to RGB
        "resize_mode": "stretch",
        "input_channels": 3,
        "scaling_factor": 255,
        "normalization": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
    }
}
_MODEL_CONFIG = {
    "model_architecture": "rfdetr",
    "task_type": "instance-segmentation",
    "backend_type": "torch",
}


def package_cache_dir(name: str) -> Path:
    """``<cache>/inference_fastpath/<name>``, the cache honouring ``XDG_CACHE_HOME``."""
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache_root / "inference_fastpath" / name


@contextlib.contextmanager
def staged_package_dir(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling directory to write a package into: it replaces ``out_dir`` when the block
    ends and is removed when the block raises, so no reader sees a half-written package.

    Example:
        >>> with staged_package_dir(Path("/tmp/demo")) as staging:  # doctest: +SKIP
        ...     write_package_metadata(staging, ["a", "b"])
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp creates 0700; the package should be readable like a normal dir
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_package_metadata(package_dir: Path, class_names: Sequence[str]) -> None:
    """The metadata files of an inference-models torch package (everything but weights.pth)."""
    package_dir = Path(package_dir)
    (package_dir / "model_config.json").write_text(json.dumps(_MODEL_CONFIG, indent=2) + "\n")
    (package_dir / "model_type.json").write_text(json.dumps({"model_type": MODEL_TYPE}) + "\n")
    (package_dir / "inference_config.json").write_text(
        json.dumps(_INFERENCE_CONFIG, indent=2) + "\n"
    )
    (package_dir / "class_names.txt").write_text("\n".join(class_names) + "\n")


def build_random_network(seed: int, num_classes: int, portable_encoder: bool = False) -> "torch.nn.Module":
    """RF-DETR-seg-nano from inference-models' code with seeded random weights (CPU, eval mode).

    ``portable_encoder`` redraws the DINOv2 encoder's random tensors with :func:`portable_uniform`:
    torch's own initialisers do not give the same encoder on every torch version, so a network
    trained on one host with this encoder frozen would not rebuild on another.

    Example:
        >>> network = build_random_network(0, num_classes=10)  # doctest: +SKIP
    """
    import torch
    from inference_models.models.rfdetr.rfdetr_base_pytorch import (
        RFDETRSegNanoConfig,
        build_model,
    )

    config = RFDETRSegNanoConfig(device=torch.device("cpu"))
    # inference-models' loader derives num_classes from class_embed rows - 1 (no-object slot).
    config.num_classes = int(num_classes)
    config.resolution = RESOLUTION
    # fork_rng: seed the weights without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_model(config=config)
        generator = torch.Generator().manual_seed(seed + 1)
        box_head = network.bbox_embed.layers[-1]
        with torch.no_grad():
            # Zero-initialised in RF-DETR (boxes == encoder anchors); give boxes varied sizes.
            box_head.weight.copy_(
                torch.randn(box_head.weight.shape, generator=generator) * BOX_WEIGHT_STD
            )
            box_head.bias.copy_(torch.tensor([0.0, 0.0, BOX_LOG_SCALE, BOX_LOG_SCALE]))
    if portable_encoder:
        redraw_encoder(network, seed)
    return network.eval()


ENCODER_STD = 0.02  # DINOv2's initializer range


def redraw_encoder(network: "torch.nn.Module", seed: int) -> None:
    """Replace every non-constant tensor of the encoder by :func:`portable_uniform` values with
    DINOv2's initialiser spread (constants - norms, layer scales, zero biases - stay)."""
    import zlib

    import torch

    encoder = network.backbone[0].encoder
    with torch.no_grad():
        for name, tensor in encoder.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            flat = tensor.detach().flatten()
            if bool((flat == flat[0]).all()):
                continue
            values = portable_uniform(tensor.numel(), ENCODER_STD, (seed, zlib.crc32(name.encode())))
            tensor.copy_(torch.from_numpy(values).reshape(tensor.shape).to(tensor.dtype))


def portable_uniform(count: int, std: float, key: Tuple[int, int]) -> np.ndarray:
    """``count`` float32 values, uniform with standard deviation ``std``, identical on every
    platform and numpy version: PCG64's raw 64-bit stream (fixed by numpy's stability policy,
    unlike its distribution methods) turned into floats with exact arithmetic and one rounding.

    Example:
        >>> portable_uniform(3, 0.02, (0, 1)).dtype
        dtype('float32')
    """
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
    raw = generator.bit_generator.random_raw(count)
    unit = (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)  # exact: 53-bit integers
    half_width = std * math.sqrt(3.0)
    return ((2.0 * unit - 1.0) * half_width).astype(np.float32)
