"""Example workflow definitions shipped with the package, and a loader that sets step options."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict

WORKFLOWS_DIR = Path(__file__).resolve().parent

FASTPATH = "rfdetr_seg_fastpath"
FASTPATH_ANNOTATED = "rfdetr_seg_fastpath_annotated"
STOCK_V3 = "rfdetr_seg_stock_v3"
STOCK_V3_ANNOTATED = "rfdetr_seg_stock_v3_annotated"


def load_workflow(name: str, step: str = "segmentation", **step_options: Any) -> Dict[str, Any]:
    """The named workflow definition with ``step_options`` written into step ``step``.

    Example:
        >>> workflow = load_workflow(FASTPATH, mask_output="rle", pipeline_depth=2)
        >>> workflow["steps"][0]["mask_output"], workflow["steps"][0]["pipeline_depth"]
        ('rle', 2)
    """
    path = WORKFLOWS_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
        raise FileNotFoundError(f"No workflow named {name!r}; available: {available}")
    definition = json.loads(path.read_text())
    if step_options:
        definition = copy.deepcopy(definition)
        matching = [s for s in definition["steps"] if s["name"] == step]
        if not matching:
            raise KeyError(f"Workflow {name!r} has no step named {step!r}")
        matching[0].update(step_options)
    return definition
