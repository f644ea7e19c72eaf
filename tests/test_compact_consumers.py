"""Every stock block that takes instance-segmentation predictions gives the same outputs on compact
masks (``mask_output: compact``) as on dense ones, over several frames (trackers keep state).

One workflow (``support/consumer_matrix.py``) holds every consumer, fed by our block; it runs once
with dense masks and once with compact masks on the same frames, each in a fresh process, and every
output is compared (images exactly, detections field by field, the random detection / inference ids
left out). The module prints, per block, how often it turned compact masks into dense ones.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, List

import numpy as np
import pytest

from support import consumer_matrix

pytestmark = pytest.mark.slow
RANDOM_KEYS = {"detection_id", "inference_id", "parent_id", "root_parent_id"}


def _random(key: Any) -> bool:
    return isinstance(key, str) and (key in RANDOM_KEYS or key.endswith("detection_id"))


def _differences(a: Any, b: Any, where: str) -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("__detections__") and b.get("__detections__"):
            a, b = {k: v for k, v in a.items() if k != "mask_type"}, {k: v for k, v in b.items() if k != "mask_type"}
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for key in a if not _random(key) for d in _differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        same = a_arr.shape == b_arr.shape and (np.array_equal(a_arr, b_arr) or (
            a_arr.dtype.kind == "f" and np.array_equal(a_arr, b_arr, equal_nan=True)))
        return [] if same else [f"{where}: arrays differ"]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == b or (np.isnan(a) and np.isnan(b)) else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def variants(demo_model_dir, clip_frames, monkeypatch_module):
    # some consumers add keys to the detections they are given, which later steps see: both processes
    # must run the steps in one order, and the engine's order follows set iteration (string hashes)
    monkeypatch_module.setenv("PYTHONHASHSEED", "0")
    frames = clip_frames[:3]
    dense, compact = [], []
    for mask_output, into in (("dense", dense), ("compact", compact)):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            into.append(pool.submit(consumer_matrix.run_variant, mask_output, demo_model_dir, frames).result())
    return dense[0], compact[0]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_consumer_gives_the_same_outputs_on_compact_masks(variants):
    dense, compact = variants
    problems = []
    for index, (d, c) in enumerate(zip(dense["results"], compact["results"])):
        assert c["seg"]["predictions"]["mask_type"] == "CompactMasks"
        assert d["seg"]["predictions"]["mask_type"] == "ndarray" and len(d["seg"]["predictions"]["xyxy"]) > 0
        for step in d:
            problems += _differences(d[step], c[step], f"frame {index} {step}")
    assert not problems, problems[:20]


def test_serialised_predictions_are_the_same(demo_model_dir, clip_frames):
    from inference.core.workflows.core_steps.common.serializers import (
        serialise_rle_sv_detections,
        serialise_sv_detections,
    )
    from inference_fastpath.workflows.running import execution_engine

    outputs = {}
    for mask_output in ("dense", "compact", "rle"):
        workflow = consumer_matrix.workflow_for(mask_output)
        workflow["steps"] = workflow["steps"][:1]
        workflow["outputs"] = [{"type": "JsonField", "name": "p", "selector": consumer_matrix.P}]
        result = execution_engine(workflow).run(runtime_parameters={
            "image": [clip_frames[0]], "model_id": demo_model_dir, "video": [consumer_matrix.video(0)]})[0]["p"]
        # the server serialises by the output's first kind: RLE for `rle`, polygons for the others
        outputs[mask_output] = (serialise_rle_sv_detections if mask_output == "rle" else serialise_sv_detections)(result)
    assert not _differences(outputs["dense"], outputs["compact"], "compact")
    assert len(outputs["rle"]["predictions"]) >= len(outputs["dense"]["predictions"]) > 0
    assert all("rle_mask" in detection and "points" not in detection for detection in outputs["rle"]["predictions"])


def test_which_consumers_densify(demo_model_dir, clip_frames):
    """The report: each consumer alone (with the steps it reads from) on compact masks, one frame."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        report = pool.submit(consumer_matrix.densify_report, demo_model_dir, clip_frames[0]).result()
    print("\ncompact-mask consumers (one frame, ~12 masks; counts include the steps each reads from):")
    for block, kinds in report.items():
        print(f"  {block:<52} {kinds or 'none'}")
    out = os.environ.get("FASTPATH_COMPACT_REPORT")
    if out:
        with open(out, "w") as handle:
            json.dump(report, handle, indent=1)
    assert report["roboflow_core/mask_visualization@v1"].get("full frames (to_dense)", 0) == 0
