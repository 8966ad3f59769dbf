"""Compile the pipelines to the committed YAML that the KFP UI accepts (`cafe compile`)."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from pipelines.ablation import ablation_pipeline
from pipelines.cafe import cafe_pipeline

COMPILED = Path(__file__).resolve().parent / "compiled"
PIPELINES = {"cafe.yaml": cafe_pipeline, "cafe-ablation.yaml": ablation_pipeline}


def compile_all(out_dir: Path = COMPILED) -> list[Path]:
    """Write every pipeline's YAML into out_dir; the output depends only on the code (byte-for-byte)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pipeline in PIPELINES.items():
        path = out_dir / name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
        written.append(path)
    return written
