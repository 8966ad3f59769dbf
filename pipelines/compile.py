"""Compile the pipelines to the committed YAML that the KFP UI accepts (`cafe compile`).

cafe.yaml is the pipeline for a shared cluster: promote.mode "ci" (a PASS is checked for parity and the CI
asked to promote). `cafe run` builds its own per the configuration's promote.mode (kfp_local)."""

from __future__ import annotations

import re
from pathlib import Path

from kfp import compiler

from cafe_core.config import ConfigError
from cafe_core.params import AblationParams, RunParams
from pipelines import ablation, cafe

COMPILED = Path(__file__).resolve().parent / "compiled"

# An image reference (the distribution/reference grammar, without IPv6 hosts): an optional registry host
# (with port) before the first "/", lower-case path components, then a tag, a digest, or both.
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_HOST}/)?{_PATH}(?:/{_PATH})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
PINNED = re.compile(rf"^{_NAME}(?::{_TAG})?@sha256:[0-9a-f]{{64}}$")
TAGGED = re.compile(rf"^{_NAME}:{_TAG}$")


def check_image(ref: str, option: str) -> str | None:
    """None for an image pinned by digest (`name@sha256:<64 hex>`, optionally with a tag before it); a
    warning for `name:tag` (what the tag points to can change between runs); ConfigError otherwise."""
    if PINNED.match(ref):
        return None
    if TAGGED.match(ref):
        return (f"{option} {ref} is a tag, not a digest: the image behind it can change between runs; pin it as "
                f"NAME@sha256:<digest> (`docker buildx imagetools inspect {ref}` prints the digest)")
    raise ConfigError(f"{option} {ref!r} is not an image reference of the form NAME@sha256:<64 hex digits> or "
                      f"NAME:TAG (e.g. registry.example.com/cafe-train@sha256:...)")


def compile_all(out_dir: Path = COMPILED, ablation_parallelism: int = ablation.PARALLELISM,
                base_image: str | None = None, train_image: str | None = None) -> list[Path]:
    """Write every pipeline's YAML into out_dir; the output depends only on the code and the arguments
    (byte-for-byte). `ablation_parallelism`: the ablation's variants trained at once (0: all). base_image /
    train_image: the images the compiled pipelines' parameters default to (check them with check_image)."""
    images = {k: v for k, v in (("base_image", base_image), ("train_image", train_image)) if v}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pipelines = {"cafe.yaml": cafe.build("ci", RunParams(**images)),
                 "cafe-ablation.yaml": ablation.build(ablation_parallelism, AblationParams(**images))}
    for name, pipeline in pipelines.items():
        path = out_dir / name
        compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
        written.append(path)
    return written
