"""The trained tensors of the demo network: which they are, their file, and loading them back.

Only what the inference path uses after the frozen encoder is trained and kept (see
``KEPT_PREFIXES``), as fp16 safetensors. A fresh network built from the same seed plus
:func:`apply_trained_params` reproduces the trained model. A SHA-256 and a value fingerprint of
the frozen tensors are stored with them and checked on load: the scheme relies on the seeded
initialisation being identical wherever the parameters are applied.

The tensors are written in shards of at most ``SHARD_BYTES``: files coming back from the GPU host
are limited in size, and a shard also keeps each committed file small.

    >>> from inference_fastpath.examples.training.trained_params import params_files
    >>> [p.name for p in params_files("examples/data/demo_params/trained_params.safetensors")]  # doctest: +SKIP
    ['trained_params.safetensors', 'trained_params.part2.safetensors']
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

LOGGER = logging.getLogger(__name__)

SHARD_BYTES = 12_000_000

PARAMS_FILE = "trained_params.safetensors"
PARAMS_FORMAT = "inference_fastpath.trained_params/1"
FINGERPRINT_TOLERANCE = 1e-4  # frozen-weight drift accepted when the digest differs (rounding, not a new init)

# Everything the eval-mode (one query group) forward uses after the frozen encoder.
KEPT_PREFIXES: Tuple[str, ...] = (
    "backbone.0.projector.", "transformer.decoder.", "transformer.enc_output.0.", "transformer.enc_output_norm.0.",
    "transformer.enc_out_bbox_embed.0.", "transformer.enc_out_class_embed.0.", "class_embed.", "bbox_embed.",
    "segmentation_head.", "refpoint_embed.", "query_feat.",
)
# Proposal heads of query groups 1..12: used only by group-DETR training, never at inference.
_GROUP_ONLY = re.compile(r"^transformer\.enc_(output|output_norm|out_bbox_embed|out_class_embed)\.[1-9]\d*\.")


class TrainedParamsError(ValueError):
    """A trained-parameters file does not fit the network it is applied to."""


def kept_names(network: torch.nn.Module) -> List[str]:
    return [n for n, _ in network.named_parameters() if n.startswith(KEPT_PREFIXES)]


def frozen_names(network: torch.nn.Module) -> List[str]:
    """State-dict entries no recipe ever trains: these must come out of the seed identically."""
    return [n for n in network.state_dict() if not n.startswith(KEPT_PREFIXES) and not _GROUP_ONLY.match(n)]


def frozen_digest(network: torch.nn.Module) -> str:
    """SHA-256 over name, dtype, shape and bytes of every frozen tensor."""
    state = network.state_dict()
    digest = hashlib.sha256()
    for name in sorted(frozen_names(network)):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def frozen_fingerprint(network: torch.nn.Module, samples: int = 8) -> Dict[str, List[float]]:
    """Per frozen tensor: mean, std and ``samples`` values at fixed positions. Unlike the digest
    this tells rounding-level drift (harmless) from a different initialisation (fatal)."""
    state, prints = network.state_dict(), {}
    for name in frozen_names(network):
        flat = state[name].detach().float().flatten().cpu()
        if flat.numel():
            picks = flat[torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()]
            prints[name] = [float(flat.mean()), float(flat.std()) if flat.numel() > 1 else 0.0, *picks.tolist()]
    return prints


def fingerprint_deviation(reference: Dict[str, List[float]], current: Dict[str, List[float]]) -> Tuple[float, str]:
    """Largest difference between two fingerprints, in units of each tensor's spread."""
    worst, where = 0.0, ""
    for name, ref in reference.items():
        got = current.get(name)
        if got is None or len(got) != len(ref):
            return math.inf, name
        deviation = max(abs(x - y) for x, y in zip(ref, got)) / max(abs(ref[1]), abs(ref[0]), 1e-6)
        if deviation > worst:
            worst, where = deviation, name
    return worst, where



def library_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"torch_version": torch.__version__, "inference_models_version": version("inference-models")}
    except PackageNotFoundError:  # pragma: no cover - metadata missing in odd installs
        return {"torch_version": torch.__version__, "inference_models_version": "unknown"}


def save_trained_params(network: torch.nn.Module, path: Path, metadata: Dict[str, Any],
                        shard_bytes: int = SHARD_BYTES) -> List[Path]:
    """Write the kept tensors as fp16 safetensors, in shards of at most ``shard_bytes`` of tensor
    data: ``path`` holds the first shard and the metadata (naming every shard), the others sit
    beside it as ``<stem>.part<k>.safetensors``. Each file is replaced atomically and ``path``
    last; a kill between the two leaves the previous first file with newer parts, which
    :func:`load_trained_tensors` refuses (their stamps differ). Returns the files written."""
    from safetensors.torch import save_file

    path = Path(path)
    params = dict(network.named_parameters())
    shards: List[Dict[str, torch.Tensor]] = [{}]
    used = 0
    for name in kept_names(network):
        value = params[name].detach().float()
        if not torch.isfinite(value).all() or value.abs().max() > torch.finfo(torch.float16).max:
            raise TrainedParamsError(f"tensor {name!r} is non-finite or outside the fp16 range")
        tensor = value.to("cpu", torch.float16).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensor
        used += size
    names = [path.name] + [f"{path.stem}.part{k}{path.suffix}" for k in range(2, len(shards) + 1)]
    stamp = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()
    files = [path.with_name(name) for name in names]
    for index in list(range(1, len(shards))) + [0]:
        text = {"format": json.dumps(PARAMS_FORMAT), "stamp": json.dumps(stamp), "shard": json.dumps(index + 1)}
        if index == 0:
            text.update({k: json.dumps(v) for k, v in metadata.items()})
            text.update(stamp=json.dumps(stamp), shards=json.dumps(names))
        tmp = files[index].with_name(files[index].name + ".tmp")
        save_file(shards[index], str(tmp), metadata=text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, files[index])
    return files


def read_params_metadata(path: Path) -> Dict[str, Any]:
    """The metadata of a trained-parameters file, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    return {key: json.loads(value) for key, value in raw.items()}  # the writer JSON-encodes every value


def params_files(path: Path) -> List[Path]:
    """Every file of the parameter set whose first file is ``path``."""
    path = Path(path)
    names = read_params_metadata(path).get("shards") or [path.name]
    return [path.with_name(name) for name in names]


def load_trained_tensors(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(metadata, tensors) of the parameter set whose first file is ``path``, shards joined; a
    missing shard or one from another run raises :class:`TrainedParamsError` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_params_metadata(path)
    if metadata.get("format") != PARAMS_FORMAT:
        raise TrainedParamsError(f"{path} is not a trained-parameters file (format {metadata.get('format')!r})")
    tensors: Dict[str, torch.Tensor] = {}
    for index, shard in enumerate(params_files(path)):
        if not shard.is_file():
            raise TrainedParamsError(f"shard {shard.name} of {path} is missing")
        if index and read_params_metadata(shard).get("stamp") != metadata.get("stamp"):
            raise TrainedParamsError(f"shard {shard.name} belongs to another run than {path.name}")
        tensors.update(load_file(str(shard)))
    return metadata, tensors


def apply_trained_params(network: torch.nn.Module, path: Path, check_frozen: bool = True) -> Dict[str, Any]:
    """Load a :func:`save_trained_params` set (its first file) into a freshly seeded network, in place.

    Every tensor must name a kept parameter of ``network`` with the same shape and every kept
    parameter must be in the file; otherwise :class:`TrainedParamsError` names the tensor. With
    ``check_frozen`` the frozen tensors of ``network`` must hash to the digest recorded at
    training time, or at least match its fingerprint to ``FINGERPRINT_TOLERANCE`` (rounding-level
    drift, logged); a different initialisation raises. Returns the file's metadata.
    """
    path = Path(path)
    metadata, tensors = load_trained_tensors(path)
    params = dict(network.named_parameters())
    expected = set(kept_names(network))
    for name, tensor in tensors.items():
        if name not in params:
            raise TrainedParamsError(f"tensor {name!r} in {path} is not a parameter of the network")
        if name not in expected:
            raise TrainedParamsError(f"tensor {name!r} in {path} belongs to a frozen module")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise TrainedParamsError(
                f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}, the network expects {tuple(params[name].shape)}"
            )
    missing = sorted(expected - set(tensors))
    if missing:
        raise TrainedParamsError(f"{path} lacks {len(missing)} trained tensor(s), first {missing[0]!r}")
    if check_frozen and metadata.get("frozen_sha256") and frozen_digest(network) != metadata["frozen_sha256"]:
        deviation, name = fingerprint_deviation(metadata.get("frozen_fingerprint", {}), frozen_fingerprint(network))
        where = (f"torch {metadata.get('torch_version')} / inference-models {metadata.get('inference_models_version')} "
                 f"there, torch {torch.__version__} here")
        if not metadata.get("frozen_fingerprint") or deviation > FINGERPRINT_TOLERANCE:
            raise TrainedParamsError(
                f"frozen tensors of this network differ from those the parameters were trained with (worst "
                f"{name!r}: {deviation:.3g} of its spread; {where}): seeded initialisation is not reproducible here"
            )
        LOGGER.warning("frozen tensors differ from training only at rounding level (%.2g of spread, %s); %s",
                       deviation, name, where)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(dtype=params[name].dtype, device=params[name].device))
    return metadata


