"""Compile the pipelines to the committed YAML that the KFP UI accepts (`cafe compile`)."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from pipelines import ablation
from pipelines.cafe import cafe_pipeline

COMPILED = Path(__file__).resolve().parent / "compiled"


def compile_all(out_dir: Path = COMPILED, ablation_parallelism: int = ablation.PARALLELISM) -> list[Path]:
    """Write every pipeline's YAML into out_dir; the output depends only on the code and the arguments
    (byte-for-byte). `ablation_parallelism`: the ablation's variants trained at once (0: all)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pipelines = {"cafe.yaml": cafe_pipeline, "cafe-ablation.yaml": ablation.build(ablation_parallelism)}
    for name, pipeline in pipelines.items():
        path = out_dir / name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
        written.append(path)
    return written
