"""checkpoint/tokenizer.py: a checkpoint's tokenizer, or None; calibration refuses a checkpoint without one."""

from __future__ import annotations

import pytest

from gemma_export.checkpoint import tokenizer
from gemma_export.errors import BadInput
from gemma_export.pipeline import calibrate


def test_a_folder_without_a_tokenizer_has_none_and_calibration_says_so(tmp_path) -> None:
    assert tokenizer.find(tmp_path) is None
    with pytest.raises(BadInput, match="int4-gptq calibrates on text") as error:
        calibrate.tokenizer_of(tmp_path)
    assert "\n" not in str(error.value)


def test_a_folder_with_tokenizer_json_gives_that_tokenizer(tmp_path) -> None:
    from tokenizers import Tokenizer, models

    saved = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    (tmp_path / "tokenizer.json").write_text(saved.to_str())
    found = tokenizer.find(tmp_path)
    assert found is not None and found.get_vocab() == {"a": 0, "b": 1, "ab": 2}
