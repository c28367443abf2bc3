"""The benchmark tests' tiny decoder."""

from __future__ import annotations

from gemma_export.dev import random_checkpoint

# The tiny Gemma 3 with default RoPE on both layer types, as Gemma 3 270M and 1B have. The tiny config's linear
# scaling of the global layers (4B and up) is the case onnxruntime-genai 0.18's builder gets wrong on the local
# layers (see genai_builder), and here its tokens must equal ours.
TINY_DECODER = {
    **random_checkpoint.TINY_CONFIGS["gemma3_text"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}
