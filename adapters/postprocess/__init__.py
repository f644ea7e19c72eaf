"""Postprocess stage: engine outputs -> host detections. `reference.py` (inference-models) and its fast twin `fused.py`."""
