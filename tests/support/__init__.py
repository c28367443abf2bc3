"""Test helpers, in one place: checkpoints (tiny random ones, written by transformers), the oracles
(transformers, onnxruntime-genai, google-deepmind's recurrentgemma), the CLI harness, op harnesses and vectors."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
