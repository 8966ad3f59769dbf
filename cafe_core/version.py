"""Which code produced an artifact: for decision records and metrics files."""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def code_version() -> str:
    """CAFE_CODE_VERSION (set by image builds), else the git commit of this checkout (+"-dirty" when it has
    uncommitted changes), else the installed package version."""
    if os.environ.get("CAFE_CODE_VERSION"):
        return os.environ["CAFE_CODE_VERSION"]
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"cafe {metadata.version('cafe')}"
    except metadata.PackageNotFoundError:
        return "unknown"
