"""Engine stage: one network forward. `reference.py` (the model's own forward) and the torch / ONNX / TensorRT twins on `base.py`, with CUDA graphs from `graphs.py`."""
