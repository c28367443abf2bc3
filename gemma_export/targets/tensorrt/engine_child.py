"""The engine-building child process (builder.py starts it): a JSON request on stdin, a JSON result on stdout.

Request: {"builder": module, "model": path to model.onnx, "plugins": bool, "shapes": {input: [min, opt, max]},
"engines": [{"cc": "8.6", "path": ...}]}. The graph is parsed once (as a strongly typed network); with
"plugins" our creators are registered first, so each GemmaAttention / GemmaRGLRU node becomes a plugin layer,
and without them the parser inlines the nodes' function bodies. The result counts the network's layers by
type, and each engine's build seconds and bytes. Failures: {"error": one line}, exit 1.
"""

from __future__ import annotations

import collections
import importlib
import json
import sys
import time
from typing import Any


def build(request: dict[str, Any]) -> dict[str, Any]:
    trt = importlib.import_module(request["builder"])
    registered: list[str] = []
    if request["plugins"]:
        from gemma_export.targets.tensorrt import plugins

        registered = plugins.register(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    if not parser.parse_from_file(request["model"]):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"ONNX parser: {' '.join(errors.split())}")
    parse_seconds = time.perf_counter() - start
    layers = collections.Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    plugin_layers = [
        network.get_layer(i).name for i in range(network.num_layers) if network.get_layer(i).type.name == "PLUGIN_V3"
    ]
    engines = []
    for engine in request["engines"]:
        config = builder.create_builder_config()
        if hasattr(config, "num_compute_capabilities"):  # TensorRT-RTX: build for the named GPU, none needed here
            config.num_compute_capabilities = 1
            cc = getattr(trt.ComputeCapability, "SM" + engine["cc"].replace(".", ""))
            config.set_compute_capability(cc, 0)
        if hasattr(trt.BuilderFlag, "TF32"):  # float32 products (all of them at fp32, attention's at bf16) stay
            config.clear_flag(trt.BuilderFlag.TF32)  # float32: TF32's 10-bit mantissa is not what the gate checked
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in request["shapes"].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"build_serialized_network returned nothing for compute capability {engine['cc']}")
        seconds = time.perf_counter() - start
        with open(engine["path"], "wb") as f:
            f.write(plan)
        engines.append({"cc": engine["cc"], "path": engine["path"], "seconds": round(seconds, 3),
                        "bytes": plan.nbytes})  # fmt: skip
    return {
        "version": str(trt.__version__),
        "registered": registered,
        "parse_seconds": round(parse_seconds, 3),
        "layers": dict(sorted(layers.items())),
        "num_layers": network.num_layers,
        "plugin_layers": len(plugin_layers),
        "engines": engines,
    }


def main() -> int:
    try:
        result = build(json.loads(sys.stdin.read()))
    except Exception as e:  # one line for the parent, whatever failed
        print(json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
