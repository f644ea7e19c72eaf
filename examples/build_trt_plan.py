"""Export a torch RF-DETR-seg model package to ONNX and, when TensorRT imports, build a TRT package.

Steps:

1. Load the torch package (``RFDetrForInstanceSegmentationTorch.from_pretrained``) or, with
   ``--random MODEL_TYPE``, a randomly initialised network (for plumbing and timing tests).
2. Export its prepared network (``prepare_capture_safe_module``: export mode, which returns
   ``(boxes, logits, masks)``, plus our sync-free transformer whose proposal geometry does not bake the
   batch size into the graph) with ``torch.onnx.export`` (TorchScript exporter, opset 17), input
   ``input``, outputs ``dets``/``labels``/``masks``; a dynamic batch axis when ``--dynamic`` is given.
3. If onnxruntime imports, check the ONNX graph against torch on the CPU (max abs difference).
4. If ``tensorrt`` imports, build ``engine.plan`` (``--fp16`` optional) with one optimisation profile:
   static (``--batch N``) or dynamic (``--dynamic MIN,OPT,MAX``), and write a TRT model package
   directory: ``model_config.json`` (backend ``trt``), ``trt_config.json``, ``engine.plan``,
   ``class_names.txt``, ``inference_config.json``.

IMPORTANT: the TensorRT part (step 4) has never been run by its author - TensorRT could not be
installed where this was written. Steps 1-3 were run on the CPU. Build plans on the machine (GPU
model, TensorRT version) that will run them.

    python -m inference_fastpath.examples.build_trt_plan --package PKG --out OUT --fp16 --dynamic 1,2,4
    python -m inference_fastpath.examples.build_trt_plan --random rfdetr-seg-nano --out OUT --onnx-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import types
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

from inference_fastpath.adapters.engine.torch_engine import build_random_model, prepare_capture_safe_module

INPUT_NAME = "input"
OUTPUT_NAMES = ("dets", "labels", "masks")


def load_torch_model(package: Optional[str], random_type: Optional[str]) -> Any:
    if random_type:
        return build_random_model(random_type, device="cpu", seed=0)
    from inference_models.models.rfdetr.rfdetr_instance_segmentation_pytorch import (
        RFDetrForInstanceSegmentationTorch,
    )

    return RFDetrForInstanceSegmentationTorch.from_pretrained(package, device=torch.device("cpu"))


def _channels_first_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
    # Same computation as the projector's LayerNorm, with the normalised shape as a constant: the
    # TorchScript exporter cannot take the traced ``(x.size(3),)`` the original passes.
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps)
    return x.permute(0, 3, 1, 2)


def make_onnx_exportable(network: torch.nn.Module) -> torch.nn.Module:
    """Instance-level tweaks on our private copy that only the ONNX exporter needs."""
    from inference_models.models.rfdetr.projector import LayerNorm as ChannelsFirstLayerNorm

    for module in network.modules():
        if isinstance(module, ChannelsFirstLayerNorm):
            module.forward = types.MethodType(_channels_first_layer_norm, module)
    return network


def export_onnx(model: Any, onnx_path: str, batch: int, dynamic: bool, opset: int = 17) -> torch.nn.Module:
    """Writes the ONNX graph; returns the exported (prepared) torch module."""
    network = make_onnx_exportable(prepare_capture_safe_module(model._model, torch.float32))
    height, width = model._inference_config.network_input.training_input_size.height, (
        model._inference_config.network_input.training_input_size.width
    )
    dummy = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        network(dummy)  # fills the proposal-geometry cache: exported as constants
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with torch.no_grad():
        torch.onnx.export(
            network,
            (dummy,),
            onnx_path,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
            dynamo=False,
        )
    return network


def check_onnx(network: torch.nn.Module, onnx_path: str, batches: List[int], hw: Tuple[int, int]) -> None:
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime not installed: skipping the ONNX check")
        return
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    for batch in batches:
        x = torch.randn(batch, 3, *hw)
        with torch.no_grad():
            expected = network(x)
        got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        diffs = [float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected)]
        print(f"onnxruntime vs torch, batch {batch}: max abs diff boxes/logits/masks = {diffs}")


def build_plan(
    onnx_path: str,
    plan_path: str,
    hw: Tuple[int, int],
    profile: Tuple[int, int, int],
    fp16: bool,
    workspace_gib: float,
) -> None:
    """Builds a TensorRT 10 plan with one optimisation profile (never run by its author)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT could not parse the ONNX graph:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    lo, opt, hi = profile
    opt_profile.set_shape(INPUT_NAME, (lo, 3, *hw), (opt, 3, *hw), (hi, 3, *hw))
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    with open(plan_path, "wb") as f:
        f.write(bytes(serialized))


def write_package_files(
    model: Any, out_dir: str, source_package: Optional[str], profile: Tuple[int, int, int]
) -> None:
    """Everything but engine.plan: configs, class names, inference config."""
    lo, opt, hi = profile
    static = lo == hi
    model_config = {
        "model_architecture": "rfdetr",
        "task_type": "instance-segmentation",
        "backend_type": "trt",
        "dynamic_batch_size_supported": not static,
    }
    if static:
        model_config["static_batch_size"] = lo
        trt_config = {"static_batch_size": lo}
    else:
        trt_config = {"dynamic_batch_size_min": lo, "dynamic_batch_size_opt": opt, "dynamic_batch_size_max": hi}
    with open(os.path.join(out_dir, "model_config.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    with open(os.path.join(out_dir, "trt_config.json"), "w") as f:
        json.dump(trt_config, f, indent=2)
    copied = False
    if source_package:
        for name in ("class_names.txt", "inference_config.json"):
            src = os.path.join(source_package, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied = True
    if not copied:
        with open(os.path.join(out_dir, "class_names.txt"), "w") as f:
            f.write("\n".join(model.class_names) + "\n")
        with open(os.path.join(out_dir, "inference_config.json"), "w") as f:
            json.dump(model._inference_config.model_dump(mode="json", exclude_none=True), f, indent=2)


def parse_profile(args: argparse.Namespace) -> Tuple[int, int, int]:
    if args.dynamic:
        lo, opt, hi = (int(v) for v in args.dynamic.split(","))
        if not 1 <= lo <= opt <= hi:
            raise SystemExit(f"--dynamic needs MIN<=OPT<=MAX, got {args.dynamic}")
        return lo, opt, hi
    return args.batch, args.batch, args.batch


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", help="torch RF-DETR-seg model package directory")
    source.add_argument("--random", metavar="MODEL_TYPE", help="random weights, e.g. rfdetr-seg-nano")
    parser.add_argument("--out", required=True, help="output TRT package directory")
    parser.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    parser.add_argument("--dynamic", metavar="MIN,OPT,MAX", help="dynamic batch profile instead")
    parser.add_argument("--fp16", action="store_true", help="allow fp16 kernels in the plan")
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export + check")
    args = parser.parse_args(argv)

    profile = parse_profile(args)
    os.makedirs(args.out, exist_ok=True)
    model = load_torch_model(args.package, args.random)
    size = model._inference_config.network_input.training_input_size
    hw = (size.height, size.width)
    onnx_path = os.path.join(args.out, "model.onnx")
    network = export_onnx(model, onnx_path, batch=profile[1], dynamic=args.dynamic is not None, opset=args.opset)
    print(f"wrote {onnx_path}")
    check_onnx(network, onnx_path, sorted({profile[0], profile[2]}) if args.dynamic else [profile[0]], hw)
    write_package_files(model, args.out, args.package, profile)
    if args.onnx_only:
        print(f"--onnx-only: package files written to {args.out} without engine.plan")
        return 0
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("tensorrt does not import here: wrote the ONNX graph and package files, no engine.plan")
        return 0
    plan_path = os.path.join(args.out, "engine.plan")
    build_plan(onnx_path, plan_path, hw, profile, args.fp16, args.workspace_gib)
    print(f"wrote {plan_path}; TRT package ready in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
