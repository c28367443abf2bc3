"""The vision half of an image + text build (a Gemma 3 checkpoint with a SigLIP tower): trace, optimize, lower,
write `vision/model.onnx` (+ its weights) and check its image features against the PyTorch reference.

The decoder half is the ordinary pipeline with models/multimodal.py's decoder; this stage runs inside the
package stage so that the manifest's file table and `vision` entry describe both graphs. The vision graph is
float32 whatever --quant (it is a small share of the weights: 0.4 B of 4 B parameters at Gemma 3 4B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.errors import ParityError
from gemma_export.manifest import ImagePreprocessing, TensorSpec, VisionInfo, VisionParity
from gemma_export.pipeline import optimize, package, trace

FOLDER = "vision"
ROLES = {"vision_model": f"{FOLDER}/{package.MODEL_FILE}", "vision_weights": f"{FOLDER}/{package.WEIGHTS_FILE}"}
TOLERANCE = 1e-4  # max abs error of the image features (float32 both sides; tests/models/test_siglip.py's bar)
CHECK_IMAGES = 2


@dataclass
class Vision:
    """What the load stage hands on for the vision half."""

    cfg: Any  # models/siglip.py VisionConfig
    model: Any  # models/siglip.py VisionModel
    preprocessing: dict[str, Any]  # runtime/images.py read_processor


def build(vision: Vision, staging: Path, target: Any) -> tuple[dict[str, str], VisionInfo]:
    """Write the vision graph into `staging/vision/`; returns its file roles and the manifest's `vision`."""
    graph = optimize.attach_functions(optimize.optimize(trace.export_vision(vision.model)), trace.OPSET)
    if target.name != "onnx":
        graph = target.lower(graph)
    folder = staging / FOLDER
    folder.mkdir()
    package.write_model(graph, folder)
    del graph
    io = package.io_spec(package.graph_proto(folder))
    parity = check(vision, folder / package.MODEL_FILE, list(target.providers))
    if not parity.passed:
        raise ParityError(f"vision parity gate failed: image features differ by {parity.max_abs_error:.3g} "
                          f"(tolerance {parity.tolerance})")  # fmt: skip
    info = VisionInfo(
        model="vision_model",
        inputs=[TensorSpec(**v) for v in io["inputs"]],
        outputs=[TensorSpec(**v) for v in io["outputs"]],
        config=vision.cfg.to_json(),
        preprocessing=ImagePreprocessing(**vision.preprocessing),
        quant="none",
        decoder_inputs=["token_type_ids", "image_features"],
        parity=parity,
    )
    return dict(ROLES), info


def check(vision: Vision, model_file: Path, providers: list[str]) -> VisionParity:
    """Image features of random pixel values: the graph on ONNX Runtime against the reference."""
    import onnxruntime as ort
    import torch

    cfg = vision.cfg
    pixels = torch.randn(CHECK_IMAGES, cfg.num_channels, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.inference_mode():
        expected = vision.model(pixels).numpy()
    session = ort.InferenceSession(str(model_file), providers=providers)
    got = session.run(["image_features"], {"pixel_values": pixels.numpy()})[0]
    error = float(np.abs(got - expected).max())
    return VisionParity(max_abs_error=error, tolerance=TOLERANCE, images=CHECK_IMAGES, passed=error <= TOLERANCE)
