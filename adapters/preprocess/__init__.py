"""Preprocess stage: frames -> the network input. `reference.py` (inference-models, PIL) and its fast twin `triton.py`."""
