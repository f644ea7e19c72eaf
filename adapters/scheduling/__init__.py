"""How a step runs its frames: `depth1.py` (synchronous) and `depth2.py` (futures), and the InferencePipeline glue."""
