"""Turn a torch RF-DETR-seg package into an inference-models ONNX package (weights.onnx + configs).

    python -m inference_fastpath.examples.onnx_package --package TORCH_PKG --out ONNX_PKG

Used to exercise the block's ONNX path offline (the demo model only exists as a torch package).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import List, Optional, Union

from inference_fastpath.examples.build_trt_plan import export_onnx, load_torch_model


def build_onnx_package(torch_package: Union[str, Path], out_dir: Union[str, Path], batch: int = 1) -> Path:
    torch_package, out_dir = Path(torch_package), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_torch_model(str(torch_package), None)
    export_onnx(model, str(out_dir / "weights.onnx"), batch=batch, dynamic=False)
    for name in ("class_names.txt", "inference_config.json"):
        shutil.copy(torch_package / name, out_dir / name)
    config = json.loads((torch_package / "model_config.json").read_text())
    config["backend_type"] = "onnx"
    (out_dir / "model_config.json").write_text(json.dumps(config))
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(build_onnx_package(args.package, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
