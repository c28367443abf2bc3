"""gemma-export: Gemma checkpoints to proven ONNX artifacts."""

__version__ = "0.1.0"
