"""`gemma-export bench` on an image + text artifact reports the image encoding time beside prefill / decode."""

from __future__ import annotations

import json

from gemma_export.cli.main import main


def test_bench_reports_image_encoding(capsys, vision_artifact) -> None:
    argv = ["bench", str(vision_artifact), "--no-compare", "--new-tokens", "2", "--prompt-tokens", "4",
            "--threads", "1", "--repeat", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    image = result["image_encoding"]
    assert image["size"] == [56, 56] and image["mm_tokens"] == 4
    assert image["seconds"] > 0 and len(image["samples"]) == 2
    assert any("image encoding" in note for note in result["notes"])
    assert result["rows"][0]["prefill_tok_s"] > 0
