"""What every stage shares: its Result, and one wrapper that times it and maps its errors.

A stage is `fn(cfg, store, ...) -> Result`. The wrapper prefixes its errors with the stage's name, keeps their
kind (`BadInput`: exit 2, `StageFailed`: exit 1) and turns a storage outage into one line that names the
endpoint, the object, the attempts and that nothing was committed at the stage's output.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cafe_core.config import CafeConfig
from cafe_core.errors import BadInput, CafeError, StageFailed
from cafe_core.storage import Storage, StorageUnavailable


@dataclass
class Result:
    """A finished stage: its committed output and what a person or the KFP UI needs to see of it."""

    stage: str
    uri: str  # the committed output (an S3 prefix or a local folder)
    summary: str  # one line for the terminal and the step's log
    meta: dict[str, Any] = field(default_factory=dict)  # figures: counts, digests, the decision, ...
    metrics: dict[str, float] = field(default_factory=dict)  # logged to a KFP Metrics artifact
    documents: dict[str, str] = field(default_factory=dict)  # for the UI, by file name (why.md, report.html)
    failure: str | None = None  # the stage ran and its verdict is negative (gate FAIL): exit 1, no exception
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """An artifact's metadata: where the data is, what pins it, the figures, the stage's own time."""
        return {"uri": self.uri, **self.meta, "seconds": round(self.seconds, 3)}


def committed(store: Storage, stage: str, uri: str, summary: str, **meta: Any) -> Result:
    """A Result for a committed output, pinned by its manifest's sha256."""
    from cafe_core.commit import manifest_digest, read_manifest

    pinned = {"manifest_sha256": manifest_digest(store, uri), "files": len(read_manifest(store, uri).entries)}
    return Result(stage, uri, summary, {**pinned, **meta})


def stage(name: str, output: Callable[[CafeConfig], str]):
    """Declare a stage: `output(cfg)` is where it commits (named when storage fails mid-way)."""

    def wrap(fn: Callable[..., Result]) -> Callable[..., Result]:
        @functools.wraps(fn)
        def run(cfg: CafeConfig, store: Storage, *args: Any, **kwargs: Any) -> Result:
            started = time.monotonic()
            try:
                result = fn(cfg, store, *args, **kwargs)
            except StorageUnavailable as e:
                raise BadInput(f"{name}: {e}; nothing was committed at {output(cfg)}") from None
            except CafeError as e:
                kind = BadInput if isinstance(e, BadInput) else StageFailed
                text = str(e)
                raise kind(text if text.startswith(f"{name}: ") else f"{name}: {text}") from None
            result.seconds = time.monotonic() - started
            return result

        return run

    return wrap
