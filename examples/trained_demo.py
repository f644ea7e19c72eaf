"""The trained demo model: RF-DETR-seg-nano that segments the synthetic shapes, built offline.

What was trained, on what, and how well (details and commands in ``examples/results/README.md``):

* **Network.** inference-models' RF-DETR-seg-nano (``build_model``, 312x312 input), seed 0, one
  class channel per shape class (disc, square, triangle, star, ring, cross) plus RF-DETR's
  no-object channel. Its DINOv2 encoder (21.7M parameters) is the seeded random draw of
  ``demo_network.build_random_network(0, 6, portable_encoder=True)`` and was never trained; the
  projector, decoder, proposal head, class/box/mask heads and queries (9.1M parameters) were.
* **Data.** Procedural scenes from ``examples/training/synthetic_scenes.py``: 1-8 shapes per
  scene on textured backgrounds, with occlusion and scale changes; 128,256 scenes in all.
* **Recipe.** ``examples/training/train_demo_model.py`` on an H200, in three runs each continuing
  the last: 493 steps of batch 32 in group-DETR mode (13 query groups), then 1,170 and 2,345 steps
  with the inference queries only (AdamW 3e-4, then 2e-4), each with warmup and cosine decay;
  RF-DETR's IoU-aware classification loss, box L1 + GIoU, mask BCE + dice; 4,008 steps, about
  18 minutes of GPU time.
* **Quality** (``examples/training/evaluate_demo_model.py``, confidence 0.4): on 400 held-out
  scenes (1,738 objects) mean mask IoU of matched detections 0.816, class-correct recall 0.845,
  precision 0.722, mask AP50 0.870; on the shapes clip (630 objects, decoded from H.264) 0.778,
  0.763, 0.678 and 0.773.

The committed parameters (``examples/data/trained_demo/``, fp16 safetensors in two shards, 18.3 MB)
are applied to the seeded network, whose frozen tensors are checked against the digest recorded
at training time; the package is written once into a cache directory.

    python -m inference_fastpath.examples.trained_demo            # prints the package directory

Example:
    >>> from inference_fastpath.examples.trained_demo import build_trained_demo_model
    >>> package = build_trained_demo_model()  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

TRAINED_PARAMS = Path(__file__).resolve().parent / "data" / "trained_demo" / "trained_params.safetensors"
STAMP_FILE = "trained_demo_stamp.json"
BUILDER_VERSION = 1  # bump when the package layout written below changes
CONFIDENCE = 0.4  # the operating point the evaluation above reports


def default_out_dir(seed: int = 0) -> Path:
    from inference_fastpath.examples.demo_network import package_cache_dir

    return package_cache_dir(f"demo-rfdetr-seg-nano-shapes-seed{seed}")


def default_video_path() -> Path:
    """The shapes clip the trained model is meant for (``examples/data/shapes_clip.mp4``)."""
    from inference_fastpath.examples.make_clip import default_shapes_clip_path

    return default_shapes_clip_path()


def params_sha256(params: Path) -> str:
    from inference_fastpath.examples.training.trained_params import params_files

    digest = hashlib.sha256()
    for path in params_files(params):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_trained_package(params: Path, package_dir: Path, seed: Optional[int] = None) -> Path:
    """Seeded network + trained tensors of ``params`` -> an inference-models torch package."""
    import torch

    from inference_fastpath.examples.demo_network import write_package_metadata
    from inference_fastpath.examples.training.train_demo_model import build_network
    from inference_fastpath.examples.training.trained_params import apply_trained_params, read_params_metadata

    metadata = read_params_metadata(params)
    network = build_network(int(metadata["seed"]) if seed is None else seed)
    apply_trained_params(network, params)
    package_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict()}, package_dir / "weights.pth")
    write_package_metadata(package_dir, metadata["class_names"])
    return package_dir


def build_trained_demo_model(out_dir: Optional[Path] = None, params: Path = TRAINED_PARAMS,
                             force: bool = False) -> Path:
    """The trained demo package directory, written on first use (about 20 s on a CPU) and reused
    while the parameters and this builder are unchanged."""
    params = Path(params)
    if not params.is_file():
        raise FileNotFoundError(f"trained parameters {params} are missing (a clone without examples/data?)")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    key: Dict[str, Any] = {"builder_version": BUILDER_VERSION, "params_sha256": params_sha256(params)}
    stamp = out_dir / STAMP_FILE
    if not force and stamp.is_file() and (out_dir / "weights.pth").is_file():
        try:
            if json.loads(stamp.read_text()).get("key") == key:
                return out_dir
        except ValueError:
            pass  # a torn stamp: rebuild
    from inference_fastpath.examples.demo_network import staged_package_dir

    with staged_package_dir(out_dir) as staging:
        write_trained_package(params, staging)
        (staging / STAMP_FILE).write_text(json.dumps({"key": key, "params": str(params), "confidence": CONFIDENCE},
                                                     indent=1) + "\n")
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build the trained demo RF-DETR-seg-nano package (shapes).")
    parser.add_argument("--out", type=Path, default=None, help="package directory (default: cache)")
    parser.add_argument("--params", type=Path, default=TRAINED_PARAMS)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    print(build_trained_demo_model(args.out, args.params, args.force))


if __name__ == "__main__":
    main()
