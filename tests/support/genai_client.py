"""onnxruntime-genai as a client of our artifacts: greedy tokens from its own Generator loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def genai_greedy(artifact: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Up to `new_tokens` greedy tokens after `prompt` (fewer when genai stops at an end-of-sequence token)."""
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    got: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    return got
