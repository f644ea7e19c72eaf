"""Visualization stages: `reference.py` (supervision's annotator, what the stock block runs) and its fast twin `mask_painting.py`."""
