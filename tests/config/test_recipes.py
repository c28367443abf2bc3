"""Recipes: the shipped files are valid and complete, the schema refuses mistakes in one line naming the
file and key, a checkpoint that is not the recipe's model is refused with the differing fields, and a build
with a recipe records it (and --random makes its checkpoint)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_export.cli.main import main
from gemma_export.config import recipes
from gemma_export.config.model_config import parse_config
from gemma_export.dev.random_checkpoint import (
    EMBEDDINGGEMMA_HEAD,
    PUBLISHED_CONFIGS,
    TINY_CONFIGS,
    write_random_checkpoint,
)
from gemma_export.errors import BadInput
from gemma_export.pipeline import options as options_module
from gemma_export.pipeline.options import BuildOptions
from gemma_export.verify import gate as verify
from tests.support import ROOT

SHIPPED = (
    "gemma-2b", "gemma-7b", "codegemma-7b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-270m", "gemma-3-1b",
    "gemma-3-4b", "gemma-3-12b", "gemma-3-27b", "recurrentgemma-2b", "recurrentgemma-9b", "embeddinggemma-300m",
    "gemma-4-e2b", "gemma-4-e4b", "gemma-4-31b", "gemma-4-26b-a4b", "gemma-4-12b",
    "embeddinggemma-2",
)  # fmt: skip


def _tiny_recipe(**changes: Any) -> dict[str, Any]:
    """A recipe for the tiny gemma3_text test model, in the shipped recipes' form."""
    base = tomllib.loads(recipes.resolve("gemma-3-270m").read_text())
    arch = {k: v for k, v in TINY_CONFIGS["gemma3_text"].items() if v is not None}
    recipe = {**base, "name": "tiny", "description": "tiny gemma3_text", "architecture": arch}
    for key, value in changes.items():  # "parity.tolerance" -> recipe["parity"]["tolerance"]
        *path, last = key.split(".")
        node = recipe
        for part in path:
            node = node[part]
        node[last] = value
    return recipe


def _write(folder: Path, recipe: dict[str, Any], name: str = "tiny") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


# -- the shipped recipes ----------------------------------------------------------------------------------


def test_every_shipped_variant_has_a_valid_recipe() -> None:
    assert set(recipes.available()) == set(SHIPPED)
    for name in SHIPPED:
        loaded = recipes.load(name)
        assert loaded.recipe.name == name
        assert loaded.sha256 == hashlib.sha256(loaded.path.read_bytes()).hexdigest()
        cfg = loaded.recipe.config()
        assert loaded.recipe.max_length <= cfg.max_position_embeddings
        assert loaded.recipe.prompts and all(p.strip() for p in loaded.recipe.prompts)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith(("gemma-2-", "gemma-3-", "embedding"))])
def test_gemma2_and_3_refuse_fp16_with_the_reason(name: str) -> None:
    recipe = recipes.load(name).recipe
    assert "fp16" not in recipe.build.precisions
    assert "fp16 range" in recipe.refusal("--precision", "fp16")


def test_recipes_are_the_published_configs() -> None:
    """random_checkpoint's published sizes are read from the recipes (one place for the architecture): every
    recipe is one, and nothing else is."""
    assert set(PUBLISHED_CONFIGS) == set(SHIPPED)


def test_codegemma_is_gemma_7b_and_embedding_head_matches() -> None:
    arch = {n: recipes.load(n).recipe.config().to_json() for n in ("codegemma-7b", "gemma-7b")}
    assert arch["codegemma-7b"] == arch["gemma-7b"]
    emb = recipes.load("embeddinggemma-300m").recipe.embedding
    assert emb is not None and tuple(emb.dense) == EMBEDDINGGEMMA_HEAD["dense"]
    assert emb.max_seq_length == EMBEDDINGGEMMA_HEAD["max_seq_length"] and emb.dims[0] == 768


# -- the schema ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"parity.colour": 1}, "parity.colour: unknown key"),
        ({"parity.tolerance": "small"}, "parity.tolerance: Input should be a valid number (got 'small')"),
        ({"parity.tolerance": -1.0}, "parity.tolerance: Input should be greater than 0"),
        ({"build.targets": "ort-cpu"}, "build.targets: Input should be a valid list"),
        (
            {"build.targets": ["tensorrt-9"]},
            "build.targets.0: Value error, unknown target 'tensorrt-9' (registered: ort-cpu, onnx, tensorrt)",
        ),
        ({"build.precisions": ["fp32", "fp32"]}, "lists a value twice"),
        ({"export.opset": 17}, "opset 17 is not supported"),
        ({"export.opset": 23.0}, "export.opset: Input should be a valid integer"),
        ({"export.cache_layout": "paged"}, "export.cache_layout: Input should be 'full' or 'windowed'"),
        ({"prompts": []}, "prompts: List should have at least 1 item"),
        ({"kind": "embedding"}, "an [embedding] table is required"),
        ({"architecture.hidden_size": "64"}, "field 'hidden_size' must be an integer, got '64'"),
        ({"architecture.model_type": "llama"}, "llama"),
        ({"name": "other"}, "name 'other' must match the file name 'tiny'"),
        ({"export.max_length": 4096}, "exceeds the architecture's max_position_embeddings 1024"),
    ],
)
def test_schema_errors_name_file_and_key(changes: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    path = _write(tmp_path, _tiny_recipe(**changes))
    with pytest.raises(BadInput) as err:
        recipes.load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_missing_section_and_bad_toml(tmp_path: Path) -> None:
    recipe = _tiny_recipe()
    del recipe["parity"]
    with pytest.raises(BadInput, match=r"tiny.toml: parity: missing required key"):
        recipes.load(_write(tmp_path, recipe))
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[build\n')
    with pytest.raises(BadInput, match=r"bad.toml: not valid TOML"):
        recipes.load(bad)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_KEYS = [
    *("name", "kind", "prompts", "build", "build.targets", "build.precisions", "build.quantizations"),
    *("build.refused", "export", "export.opset", "export.cache_layout", "export.max_length", "parity"),
    *("parity.tolerance", "parity.int8", "parity.int4", "architecture", "architecture.hidden_size"),
    *("architecture.model_type", "architecture.layer_types", "architecture.rope_parameters", "embedding"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_KEYS), value=_json)
def test_fuzz_recipe_values(key: str, value: Any, tmp_path: Path) -> None:
    """Any value at any key: a valid recipe or one BadInput line naming the file, never another exception."""
    recipe = _tiny_recipe()
    *path, last = key.split(".")
    node = recipe
    for part in path:
        node = node[part]
    node[last] = value
    try:
        text = tomli_w.dumps(_drop_none(recipe))
    except (TypeError, ValueError):  # not representable in TOML (e.g. a NaN key); nothing to load
        return
    file = tmp_path / "tiny.toml"
    file.write_text(text)
    try:
        recipes.load(file)
    except BadInput as e:
        assert str(e).startswith(str(file)) and "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_recipe_bytes(raw: bytes, tmp_path: Path) -> None:
    file = tmp_path / "tiny.toml"
    file.write_bytes(raw)
    with pytest.raises(BadInput) as err:  # no random bytes make a complete recipe
        recipes.load(file)
    assert str(err.value).startswith(str(file)) and "\n" not in str(err.value)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value if v is not None]
    return value


# -- checkpoints against recipes ------------------------------------------------------------------------------


def test_check_checkpoint_names_the_differing_fields() -> None:
    recipe = recipes.load("gemma-2-2b").recipe
    tiny = parse_config(TINY_CONFIGS["gemma2"])
    with pytest.raises(BadInput) as err:
        recipes.check_checkpoint(recipe, tiny, "ckpt")
    message = str(err.value)
    assert message.startswith("ckpt: not a gemma-2-2b checkpoint")
    assert "hidden_size: recipe 2304, checkpoint 64" in message and "\n" not in message
    # token ids and the config's spelling are not architecture: an instruction-tuned eos is accepted
    recipes.check_checkpoint(recipe, parse_config({**recipe.architecture, "eos_token_id": [1, 107]}), "it")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", TINY_CONFIGS["gemma3_text"], seed=1)


def test_build_refuses_a_checkpoint_of_another_size(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["build", str(tiny_checkpoint), "-o", str(out), "--recipe", "gemma-3-1b"]) == 2
    err = capsys.readouterr().err
    assert "not a gemma-3-1b checkpoint" in err and "hidden_size: recipe 1152, checkpoint 64" in err
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--recipe", "embeddinggemma-300m"], "recipe embeddinggemma-300m is for a embedding model"),
        (["--recipe", "gemma-3-1b", "--precision", "bf16"], "no bf16 MatMul kernel"),
        (["--recipe", "embeddinggemma-300m", "--target", "tensorrt"], "does not offer --target 'tensorrt'"),
        (
            ["--recipe", "gemma-3-1b", "--target", "tensorrt", "--precision", "fp16"],
            "does not offer --precision 'fp16' for --target tensorrt: activations exceed the fp16 range",
        ),
        (["--recipe", "no-such-model"], "unknown recipe 'no-such-model'; known: codegemma-7b"),
        (["--random"], "need --recipe NAME"),
    ],
)
def test_build_recipe_refusals(
    argv: list[str], fragment: str, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["build", str(tiny_checkpoint), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and not out.exists()


def test_a_recipe_offering_int4_offers_its_variants(tiny_checkpoint: Path) -> None:
    """int4-gptq / int4-rtn / int4-plain under a recipe that offers int4: allowed, with their own default gates
    (not the recipe's int4 gate, measured for int4 itself); a recipe without int4 still refuses them."""
    recipe = recipes.load("gemma-3-270m")
    for quant in options_module.INT4_VARIANTS:
        chosen = options_module.with_recipe(BuildOptions(quant=quant, recipe=recipe), {"quant", "recipe"})
        assert (chosen.min_top1, chosen.max_kl) == (None, None)
        assert chosen.agreement_gate() == verify.AGREEMENT_GATES[quant]
    int4 = options_module.with_recipe(BuildOptions(quant="int4", recipe=recipe), {"quant", "recipe"})
    assert int4.max_kl == recipe.recipe.parity.int4.max_kl
    embedding = recipes.load("embeddinggemma-300m")
    with pytest.raises(BadInput, match="does not offer --quant 'int4-rtn'"):
        options_module.with_recipe(BuildOptions(quant="int4-rtn", recipe=embedding), {"quant", "recipe"})


def test_random_with_a_checkpoint_is_refused(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    argv = ["build", str(tiny_checkpoint), "-o", str(tmp_path / "o"), "--recipe", "gemma-3-1b", "--random"]
    assert main(argv) == 2
    assert "either CHECKPOINT or --recipe NAME --random" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not Path("build/random/gemma-3-1b-seed0").exists()


@pytest.mark.slow
def test_build_with_recipe_records_it(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    changes = {"parity.tolerance": 2e-4, "export.max_length": 512, "export.cache_layout": "windowed"}
    recipe_file = _write(tmp_path, _tiny_recipe(**changes))
    out = tmp_path / "out"
    assert main(["build", str(tiny_checkpoint), "-o", str(out), "--recipe", str(recipe_file), "--json"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["recipe"]
    assert record["name"] == "tiny" and record["sha256"] == hashlib.sha256(recipe_file.read_bytes()).hexdigest()
    assert record["content"]["parity"]["tolerance"] == 2e-4 and "random_checkpoint" not in record
    assert manifest["parity"]["tolerance"] == 2e-4 and manifest["build"]["max_length"] == 512
    assert manifest["build"]["target"] == "ort-cpu" and manifest["build"]["precision"] == "fp32"
    assert manifest["build"]["cache_layout"] == "windowed"  # the recipe's export option, not the default
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.slow
def test_build_random_from_recipe(tmp_path: Path) -> None:
    """--random writes the recipe's architecture once (reused on the next build), cut to --layers, and the
    two builds of the same random checkpoint are byte-identical."""
    recipe_file = _write(tmp_path, _tiny_recipe())
    common = ["--recipe", str(recipe_file), "--random", "--seed", "3", "--layers", "2", "--random-dir", str(tmp_path)]
    assert main(["build", *common, "-o", str(tmp_path / "a"), "--target", "onnx"]) == 0
    checkpoint = tmp_path / "tiny-seed3-2l"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == TINY_CONFIGS["gemma3_text"]["hidden_size"]
    stamp = (checkpoint / "config.json").stat().st_mtime_ns
    assert main(["build", *common, "-o", str(tmp_path / "b"), "--target", "onnx"]) == 0
    assert (checkpoint / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["recipe"]["random_checkpoint"] == {"seed": 3, "layers": 2}
    assert manifest["build"]["target"] == "onnx"
    for name in ("model.onnx", "model.onnx.data", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# -- the CLI and the CI example ----------------------------------------------------------------------------


def test_recipes_list_and_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["ok"] and [r["name"] for r in listed["recipes"]] == sorted(SHIPPED)
    assert main(["recipes", "show", "recurrentgemma-2b", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["recipe"]
    assert shown["sha256"] == recipes.load("recurrentgemma-2b").sha256
    assert shown["content"]["export"]["cache_layout"] == "windowed"
    assert main(["recipes", "show", "gemma-3-1b"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# ") and tomllib.loads(text)["name"] == "gemma-3-1b"
    assert main(["recipes", "show", "gemma-4"]) == 2
    assert "unknown recipe 'gemma-4'" in capsys.readouterr().err


def test_ci_example_uses_commands_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """The documented workflow parses, and the gemma-export invocations in it are accepted by the CLI."""
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / "docs" / "ci" / "build-artifacts.yml").read_text())
    steps = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    text = "\n".join(steps)
    for command in ("recipes list --json", "build $src --recipe", "verify "):
        assert command in text
    assert main(["build", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--recipe", "--random", "--layers", "--json"))
