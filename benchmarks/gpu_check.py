"""GPU acceptance check: one command, under 8 minutes on one H100/H200-class GPU, one table, exit 1 on any failure.

On this (CPU) machine, once:   make gpu-wheels       # the wheels the check needs, into gpu-wheels/ (< 60 MB)
On the GPU machine (offline):  python3 benchmarks/gpu_check.py --install
Plumbing test on CPU:          .venv/bin/python benchmarks/gpu_check.py --cpu

--install makes a virtual environment (.gpu-venv) over the machine's own CUDA torch, installs gpu-wheels/
into it offline (pip --no-index --no-deps), then runs the check with it; the set-up counts against the 8
minutes. Our pinned transformers 5 replaces the machine's older one (the code needs 5: LlavaOnevision's
image processor without torchvision, rope_parameters, dtype=), and our numpy 2 its numpy (pyarrow 26
refuses numpy 1). The machine's torch comes in through links to torch and the packages it requires, not
through --system-site-packages: anything else of the machine's built against numpy 1 (scipy, which
transformers imports whenever it sees it) would break under numpy 2.

What is checked (the table's rows):
 a  2 ranks sharing the one GPU, process group "cuda:gloo" (no CPU backend: any collective on a CPU tensor
    fails, as it would under NCCL), tiny model, bf16, ZeRO-2 and ZeRO-3, each with contrastive_batch
    micro (grad_accum 1) and step (gradient caching, grad_accum 2); 20 steps: the run finishes, every
    logged loss is finite and the loss falls (mean of the last 5 steps below the mean of the first 5).
    The four runs go at once (they are small); a checkpoint is written at step 10.
 b  the llava-onevision-qwen2-0.5b-si shapes (random init, nothing downloaded), bf16, ZeRO-2, one rank,
    gradient checkpointing off and on: tokens/s, samples/s and MFU as the trainer logs them (the last
    log window, after warm-up), peak GPU memory (torch.cuda.max_memory_allocated, read by this script in
    the training process after `cafe train` returns; or the trainer's own `peak_mem_gb` when it logs one;
    the row says which). Then, with gradient caching (contrastive_batch=step, grad_accum > 1, micro-batch
    fixed), the largest contrastive batch reached by doubling the global batch until OOM, a cap or the
    time left (2 steps a try).
 c  the same 0.5B shapes, bf16, on the GPU: `embed_items` (what `cafe export` runs) over 2,000 items (1,000
    shapes images, 1,000 captions, benchmarks/export.py's items) and `generate_answers` (what `cafe
    evaluate`'s POPE family runs) for 300 POPE questions of the synthetic set (100 per split), with the
    config's default batch sizes: items/s and answers/s, model load excluded.

--cpu runs part a only, on the CPU with gloo: 2 ranks, ZeRO-2, one row, a few steps (the plumbing test,
tests/test_gpu_check.py).

Everything is local files (root=<work dir>): no S3 server. This file imports only the standard library at
module level, so --install and --wheels run before the project's dependencies exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "local.yaml"
WHEELS = REPO / "gpu-wheels"
VENV = REPO / ".gpu-venv"
T0_ENV = "CAFE_GPU_CHECK_T0"  # when --install started, so the set-up counts against the budget
BUDGET_S = 480.0  # the whole check, set-up included
MARGIN_S = 15.0  # kept back for printing and slow exits
PRESET_0_5B = "llava-onevision-qwen2-0.5b-si"
# The 0.5B shapes: the largest anyres grid (6x6 crops) takes 8154 image tokens, and max_length must leave
# room for it (the trainer checks); rows are only as wide as the batch needs.
MAX_LENGTH_0_5B = 8448


# === wheels (make gpu-wheels, on the CPU machine) =====================================================

# What the check imports besides torch and the packages torch requires (filelock, fsspec, jinja2, networkx,
# sympy, nvidia-*, triton), which the GPU machine has and --install links in. numpy is ours too: pyarrow 26
# refuses numpy 1.x. Pins from constraints.txt.
GPU_WHEELS = (
    # the project
    "numpy", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "PyYAML",
    "pyarrow", "pillow", "tqdm", "safetensors", "boto3", "botocore", "s3transfer", "jmespath",
    "python-dateutil", "six", "urllib3", "certifi",
    # the loss curve every training run writes (matplotlib, Agg)
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "packaging",
    # transformers 5 (the machine's older one cannot build these models) and what it imports
    "transformers", "tokenizers", "huggingface_hub", "regex", "httpx2", "httpcore2", "h11", "anyio", "idna",
    "truststore",
    # deepspeed (an sdist: built here as a pure-python wheel; its ops are JIT-compiled, and none is used)
    "deepspeed", "hjson", "msgpack", "psutil", "py-cpuinfo", "einops", "tabulate",
)
BUILT_FROM_SDIST = ("deepspeed",)
MAX_WHEELS_MB = 60.0
# transformers.models subpackages the check imports (the rest of the 400-odd models are dropped).
TRANSFORMERS_MODELS = ("auto", "encoder_decoder", "llava", "llava_next", "llava_onevision", "qwen2", "siglip")
BOTOCORE_SERVICES = ("s3", "sts")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: Path = REPO / "constraints.txt") -> dict[str, str]:
    out = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            out[canonical(name)] = f"{name}=={version}"
    return out


def _soname_duplicate(name: str, names: set[str]) -> bool:
    """libX.so and libX.so.N.M.P next to libX.so.N: copies of one library (a wheel cannot hold symlinks);
    the loader only asks for the SONAME, libX.so.N."""
    m = re.match(r"^(.*\.so)((?:\.\d+)*)$", name)
    if not m:
        return False
    base, suffix = m.groups()
    versions = suffix.split(".")[1:]
    if len(versions) == 1:
        return False
    return any(n.startswith(base + ".") and len(n[len(base):].split(".")) == 2 and n != name for n in names)


def _drop(dist: str, path: str, names: set[str]) -> bool:
    """Files of a wheel the check never loads (the wheel folder must stay under 60 MB)."""
    parts = path.split("/")
    base = parts[-1]
    if base.endswith(".pyi"):  # type stubs
        return True
    if dist == "numpy":
        return "tests" in parts or parts[1:2] in (["distutils"], ["_pyinstaller"])
    if dist == "pyarrow":
        return (parts[1:2] in (["include"], ["src"], ["tests"]) or "flight" in base
                or base.startswith(("libarrow_s3", "_s3fs", "_pyarrow_cpp_tests"))
                or base.endswith((".pyx", ".pxd", ".pxi", ".h", ".cc")) or _soname_duplicate(path, names))
    if dist == "botocore":  # service models: only S3's (and STS's) are ever loaded
        return parts[1] == "data" and len(parts) > 3 and parts[2] not in BOTOCORE_SERVICES
    if dist == "transformers":
        return parts[1] == "models" and len(parts) > 3 and parts[2] not in TRANSFORMERS_MODELS
    if dist == "matplotlib":
        return ("tests" in parts or "sample_data" in parts or "web_backend" in parts or "afm" in parts
                or "pdfcorefonts" in parts or base.startswith(("DejaVuSerif", "DejaVuSansMono", "_tkagg")))
    if dist == "fonttools":  # matplotlib's Agg output reads only fontTools.agl and fontTools.misc (pure python)
        return (parts[0] == "fontTools" and not (base in ("__init__.py", "agl.py") and len(parts) == 2)
                and parts[1] not in ("misc", "config") or base.endswith(".so"))
    if dist == "pillow":  # no text drawing, colour management, WebP, AVIF or Tk: their modules and libraries
        return base.startswith(("_avif", "libavif", "_imagingft", "libfreetype", "libharfbuzz", "libbrotli",
                                "libpng16", "_imagingcms", "liblcms2", "_webp", "libwebp", "libsharpyuv", "_imagingtk"))
    return False


def slim_wheel(dist: str, src: Path, dst: Path) -> None:
    """Copy a wheel without the files `_drop` names (their RECORD lines removed with them), compressed with
    LZMA instead of deflate: a third smaller for the shared libraries. pip reads such a wheel with the
    standard zipfile module, which needs Python's lzma module (--install checks it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_LZMA) as zout:
        names = set(zin.namelist())
        dropped = {n for n in names if not n.endswith(".dist-info/RECORD") and _drop(dist, n, names)}
        for info in zin.infolist():
            if info.filename in dropped:
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",", 1)[0] not in dropped).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_LZMA)


def build_wheels(dest: Path, python_version: str) -> int:
    """Download (or build) every wheel of GPU_WHEELS at its constraints.txt pin for CPython
    `python_version` on manylinux x86_64, slim them, write them to `dest` and print their sizes."""
    pinned = pins()
    missing = [d for d in GPU_WHEELS if canonical(d) not in pinned]
    if missing:
        print(f"error: not pinned in constraints.txt: {', '.join(missing)}", file=sys.stderr)
        return 2
    abi = "cp" + python_version.replace(".", "")
    with tempfile.TemporaryDirectory(prefix="cafe-gpu-wheels-") as tmp:
        raw = Path(tmp)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        binary = [pinned[canonical(d)] for d in GPU_WHEELS if d not in BUILT_FROM_SDIST]
        platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                 "manylinux2014_x86_64", "manylinux2010_x86_64", "linux_x86_64")]
        subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", *platforms,
                        f"--python-version={python_version}", "--implementation=cp", f"--abi={abi}", "--abi=abi3",
                        "--abi=none", f"--dest={raw}", *binary], check=True)
        # An sdist: built here without isolation (its setup.py imports the torch of this venv), no ops compiled.
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", f"--wheel-dir={raw}",
                        *(pinned[canonical(d)] for d in BUILT_FROM_SDIST)], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.whl"):
            old.unlink()
        rows = []
        for whl in sorted(raw.glob("*.whl")):
            dist = canonical(whl.name.split("-")[0])
            slim_wheel(dist, whl, dest / whl.name)
            rows.append((whl.name, whl.stat().st_size, (dest / whl.name).stat().st_size))
    total = sum(r[2] for r in rows)
    print(f"{'wheel':<86} {'MB':>6} {'slimmed':>8}")
    for name, before, after in sorted(rows, key=lambda r: -r[2]):
        print(f"{name:<86} {before / 1e6:6.2f} {after / 1e6:8.2f}")
    print(f"{len(rows)} wheels in {dest}: {total / 1e6:.1f} MB (downloaded {sum(r[1] for r in rows) / 1e6:.1f} MB; "
          f"limit {MAX_WHEELS_MB:.0f} MB)")
    if total > MAX_WHEELS_MB * 1e6:
        print(f"FAILED: the wheels take {total / 1e6:.1f} MB, more than {MAX_WHEELS_MB:.0f} MB", file=sys.stderr)
        return 1
    return 0


# === install (on the GPU machine, offline) ============================================================


def _run_quiet(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install(wheels: Path, venv: Path) -> Path:
    """A venv with gpu-wheels installed offline, over the machine's own torch; returns its python. Reused
    when it already holds exactly these wheels.

    The machine's torch comes in through an overlay, not --system-site-packages: a folder of links to torch
    and the packages it requires (recursively), named by a .pth file after the venv's own packages. Our
    numpy 2 (pyarrow 26 refuses numpy 1) would break whatever else the machine has compiled against numpy
    1 (scipy, pandas, ...), and transformers imports scipy whenever it can see it."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        sys.exit(f"error: no wheels in {wheels}: run `make gpu-wheels` on the CPU machine and bring the folder along")
    tags = {m.group(1) for f in files if (m := re.search(r"-(cp3\d+)-(?:cp3\d+|abi3)-", f.name))}
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if tags and here not in tags:
        sys.exit(f"error: the wheels are built for {', '.join(sorted(tags))} and this is Python "
                 f"{sys.version_info.major}.{sys.version_info.minor}: run `make gpu-wheels GPU_PYTHON="
                 f"{sys.version_info.major}.{sys.version_info.minor}`")
    try:
        import lzma  # noqa: F401  (the wheels are LZMA-compressed)

        import torch
    except ImportError as e:
        sys.exit(f"error: {sys.executable} cannot import {e.name}: run --install with the Python that has the "
                 "machine's CUDA torch (and its lzma module)")
    print(f"install: Python {sys.version.split()[0]}, torch {torch.__version__} at {Path(torch.__file__).parent} "
          f"(CUDA available: {torch.cuda.is_available()})", flush=True)
    python = venv / "bin" / "python"
    stamp = venv / ".gpu-wheels"
    wanted = "\n".join(f"{f.name} {f.stat().st_size}" for f in files) + f"\ntorch {torch.__version__} {torch.__file__}"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        print(f"install: {venv} already holds these wheels", flush=True)
        return python
    shutil.rmtree(venv, ignore_errors=True)
    pip: list[str] = [str(python), "-m", "pip"]
    if _run_quiet([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
        # no ensurepip (Debian's python3 without python3-venv): the machine's pip installs into it
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        pip = [sys.executable, "-m", "pip", "--python", str(python)]
    shipped = {canonical(f.name.split("-")[0]) for f in files}
    linked = torch_overlay(venv / "machine-torch", shipped)
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site_packages / "cafe_machine_torch.pth").write_text(f"{venv / 'machine-torch'}\n")
    start = time.monotonic()
    subprocess.run([*pip, "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps",
                    f"--find-links={wheels}", *map(str, files)], check=True)
    check = _run_quiet([str(python), "-c", "import numpy, torch, transformers, deepspeed, pyarrow, PIL, matplotlib, "
                        "pydantic, boto3; torch.from_numpy(numpy.ones(2)); print('torch', torch.__version__, "
                        "'numpy', numpy.__version__, 'transformers', transformers.__version__, 'deepspeed', "
                        "deepspeed.__version__)"], env={**os.environ, "PYTHONPATH": str(REPO)})
    if check.returncode != 0:
        sys.exit(f"error: the installed packages do not import:\n{check.stderr[-3000:]}")
    print(f"install: {len(files)} wheels into {venv} in {time.monotonic() - start:.0f} s, over the machine's "
          f"{', '.join(linked)}; {check.stdout.strip().splitlines()[-1]}", flush=True)
    stamp.write_text(wanted)
    return python


def torch_overlay(folder: Path, shipped: set[str]) -> list[str]:
    """Links in `folder` to the installed files of torch and of every distribution it requires,
    recursively (extras aside), except those `shipped` in the wheels; returns 'name version' of each."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    todo, seen, linked = ["torch"], set(), []
    while todo:
        name = canonical(todo.pop())
        if name in seen or name in shipped:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        todo += [m.group(0) for req in dist.requires or [] if not re.search(r"extra\s*==", req)
                 if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()))]
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            src, dst = Path(dist.locate_file(top)), folder / top
            if src.exists() and not (dst.exists() or dst.is_symlink()):
                dst.symlink_to(src)
        linked.append(f"{dist.metadata['Name']} {dist.version}")
    return linked


# === the check ========================================================================================


@dataclass
class Row:
    part: str
    name: str
    ok: bool | None = None  # None: not run
    figures: str = ""
    seconds: float = 0.0
    log: Path | None = None
    detail: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "FAIL (not run)"}[self.ok]


class Clock:
    """The budget: every part's timeout is its own cap, cut to what the deadline leaves after the later
    parts' reserves."""

    def __init__(self, budget: float | None):
        start = float(os.environ.get(T0_ENV, time.time()))
        self.start = start
        self.deadline = None if budget is None else start + budget - MARGIN_S

    def elapsed(self) -> float:
        return time.time() - self.start

    def timeout(self, cap: float, reserve_after: float = 0.0) -> float:
        if self.deadline is None:
            return cap
        return max(0.0, min(cap, self.deadline - time.time() - reserve_after))


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
               MPLCONFIGDIR=str(work / "mpl"), PYTHONUNBUFFERED="1")
    for var in list(env):  # local files only: no S3 endpoint or credentials of the caller's
        if var.startswith("AWS_"):
            del env[var]
    return env


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run cmd (in its own process group, so torchrun's children go with it) with output to `log`;
    returns (exit status or None on timeout, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this script created for the child, nothing else
    except ProcessLookupError:
        pass
    proc.wait()


def tail(log: Path | None, lines: int = 10) -> str:
    """The first distinct exception lines of a log (torchrun's summary hides them at the end) and its end."""
    if not log or not log.exists():
        return ""
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = []
    for line in text:
        if re.search(r"\b\w*(Error|Exception)\b: |^error: |^FAILED: ", line) and "ChildFailedError" not in line:
            if line not in errors:
                errors.append(line)
    shown = [*(f"[error] {e}" for e in errors[:3]), *text[-lines:]]
    return "\n".join("      " + line[:240] for line in shown)


def cafe(*args: str) -> list[str]:
    return [sys.executable, "-m", "cafe_core.cli", *args, "--config", str(CONFIG)]


def read_metrics(output: Path) -> list[dict]:
    path = output / "final" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def optional_keys(work: Path, row: str) -> list[str]:
    """Overrides for keys that only some versions of the config have."""
    try:
        from cafe_core.config import TrainConfig
    except ImportError:
        return []
    out = []
    if "cache" in TrainConfig.model_fields:  # the node-local shard cache: each run its own, under the work dir
        out.append(f"train.cache.dir={work / 'cache' / row}")
    return out


# --- data ---------------------------------------------------------------------------------------------


def prepare_data(work: Path, root: Path, train_size: int, pope_images: int, timeout: float, env) -> Row:
    row = Row("-", f"data: cafe data synth + cafe convert ({train_size} pairs)")
    common = [f"root={root}", "run_id=data"]
    synth = [*common, f"synth.train_size={train_size}", f"synth.train_shard_rows={max(train_size // 2, 1)}",
             "synth.bad_fraction=0", "synth.retrieval_images=4", f"synth.pope_images={pope_images}",
             "synth.mmeb_rows_per_dataset=2", "synth.mc_questions=4", "synth.caption_images=2"]
    start = time.monotonic()
    for i, cmd in enumerate((cafe("data", "synth", *synth), cafe("convert", *synth, "data.workers=0"))):
        row.log = work / "logs" / f"data-{i}.log"
        rc, _ = run_logged(cmd, row.log, timeout - (time.monotonic() - start), env)
        if rc != 0:
            row.ok, row.figures = False, "timed out" if rc is None else f"exit {rc}"
            break
    else:
        row.ok, row.figures = True, f"{root}/runs/data/convert"
    row.seconds = time.monotonic() - start
    return row


# --- part a -------------------------------------------------------------------------------------------


@dataclass
class ARun:
    zero: int
    contrastive: str
    grad_accum: int


def part_a_args(work: Path, root: Path, run: ARun, gpu: bool, steps: int) -> tuple[str, list[str]]:
    name = f"a-zero{run.zero}-{run.contrastive}"
    args = [
        f"root={root}", "run_id=data", f"train.output={work / 'out' / name}",
        "model.preset=tiny", "model.checkpoint=null",
        "train.nproc_per_node=2", f"train.zero_stage={run.zero}", f"train.max_steps={steps}",
        "train.global_batch_size=8", f"train.grad_accum={run.grad_accum}", f"train.contrastive_batch={run.contrastive}",
        f"train.log_every={max(steps // 4, 1)}", "train.heldout_size=8", f"train.eval_every={steps}",
        f"train.checkpoint_every={max(steps // 2, 1)}", "train.max_length=256", "train.resume=none",
        # gloo for CUDA tensors and no CPU backend: a collective on a CPU tensor fails, as under NCCL.
        f"train.dist_backend={'cuda:gloo' if gpu else 'gloo'}",
        *(["train.precision=bf16", "model.dtype=bfloat16"] if gpu else ["train.precision=fp32"]),
        *optional_keys(work, name),
    ]
    return name, args


def judge_losses(metrics: list[dict], steps: int) -> tuple[bool, str]:
    if len(metrics) != steps:
        return False, f"{len(metrics)} of {steps} steps logged"
    losses = {k: [m.get(k) for m in metrics] for k in metrics[0] if k.startswith("loss")}
    bad = [k for k, vs in losses.items() if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vs)]
    if bad or "loss" not in losses:
        return False, f"non-finite or missing: {', '.join(bad) or 'loss'}"
    k = max(1, min(5, steps // 3))
    first, last = sum(losses["loss"][:k]) / k, sum(losses["loss"][-k:]) / k
    text = f"loss {first:.3f} -> {last:.3f} (mean of first/last {k} of {steps} steps)"
    return last < first, text + ("" if last < first else ": NOT falling")


def part_a(work: Path, root: Path, runs: list[ARun], gpu: bool, steps: int, timeout: float, env) -> list[Row]:
    """All runs at once (tiny model): each its own torchrun of 2 ranks on the one GPU (or the CPU)."""
    procs = []
    start = time.monotonic()
    for run in runs:
        name, args = part_a_args(work, root, run, gpu, steps)
        log = work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "w")
        proc = subprocess.Popen(cafe("train", *args), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        row = Row("a", f"tiny, 2 ranks on 1 {'GPU' if gpu else 'CPU'}, {'cuda:gloo' if gpu else 'gloo'}, "
                       f"{'bf16' if gpu else 'fp32'}, ZeRO-{run.zero}, contrastive {run.contrastive} "
                       f"(grad_accum {run.grad_accum})", log=log)
        procs.append((proc, out, row, name))
    rows = []
    for proc, out, row, name in procs:
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        out.close()
        row.seconds = time.monotonic() - start
        if rc != 0:
            row.ok, row.figures = False, "timed out" if rc is None else f"exit {rc}"
        else:
            row.detail["losses"] = [m.get("loss") for m in read_metrics(work / "out" / name)]
            row.ok, row.figures = judge_losses(read_metrics(work / "out" / name), steps)
        rows.append(row)
    # ZeRO stage and contrastive_batch (micro with grad_accum 1, step with 2) change nothing but memory, so the
    # curves should agree up to rounding: shown, not judged (bf16 rounding differs with the partitioning).
    ref = rows[0].detail.get("losses")
    for row in rows[1:]:
        losses = row.detail.get("losses")
        if ref and losses and len(ref) == len(losses) and all(isinstance(v, float) for v in ref + losses):
            diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, losses))
            row.figures += f"; max relative difference from the first row's curve {diff:.1e}"
    return rows


# --- part b -------------------------------------------------------------------------------------------


@dataclass
class Model:
    """Parts b and c: the 0.5B shapes in bf16 on the GPU; any preset in fp32 for a dry run on the CPU."""

    preset: str = PRESET_0_5B
    gpu: bool = True

    def overrides(self) -> list[str]:
        precision = ["model.dtype=bfloat16", "train.precision=bf16"] if self.gpu else ["train.precision=fp32"]
        return [f"model.preset={self.preset}", "model.checkpoint=null", *precision]

    @property
    def label(self) -> str:
        return f"{'0.5B shapes' if self.preset == PRESET_0_5B else self.preset}, {'bf16' if self.gpu else 'fp32, CPU'}"


def b_args(work: Path, root: Path, model: Model, name: str, global_batch: int, grad_accum: int, contrastive: str,
           ckpt: bool, steps: int, log_every: int) -> list[str]:
    return [
        f"root={root}", "run_id=data", f"train.output={work / 'out' / name}", *model.overrides(),
        "train.zero_stage=2", "train.nproc_per_node=1",
        f"train.global_batch_size={global_batch}", f"train.grad_accum={grad_accum}",
        f"train.contrastive_batch={contrastive}", f"train.gradient_checkpointing={str(ckpt).lower()}",
        f"train.max_steps={steps}", f"train.log_every={log_every}", "train.heldout=null",
        "train.checkpoint_every=100000", "train.resume=none", f"train.max_length={MAX_LENGTH_0_5B}",
        *optional_keys(work, name),
    ]


def train_in_wrapper(work: Path, name: str, args: list[str], timeout: float, env) -> tuple[dict, Path, float]:
    """`cafe train` (one rank: in this child process, no torchrun) in a child that also reports the peak GPU
    memory and whether it ran out of memory. The run's model folder is deleted after (1.8 GB each)."""
    result = work / "out" / f"{name}.result.json"
    result.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    rc, seconds = run_logged([sys.executable, str(Path(__file__).resolve()), "--train-child", str(result), "--",
                              *args], log, timeout, env)
    shutil.rmtree(work / "out" / name / "final" / "model", ignore_errors=True)
    out = json.loads(result.read_text()) if result.exists() else {}
    out.setdefault("rc", rc)
    if rc is None:
        out["timed_out"] = True
    return out, log, seconds


def train_child(result: Path, argv: list[str]) -> int:
    import torch

    from cafe_core.cli import main

    out: dict = {"rc": None, "oom": False}
    try:
        out["rc"] = main(["train", "--config", str(CONFIG), *argv])
    except torch.cuda.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001  (reported in the table; the traceback goes to the log)
        import traceback

        traceback.print_exc()
        out.update(error=f"{type(e).__name__}: {str(e)[:300]}", oom="out of memory" in str(e).lower())
        out["rc"] = 1
    if torch.cuda.is_available():
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    result.write_text(json.dumps(out))
    return 0 if out["rc"] == 0 else 1


def throughput_row(work: Path, root: Path, model: Model, ckpt: bool, batch: int, steps: int, timeout: float,
                   env) -> Row:
    name = f"b-ckpt-{'on' if ckpt else 'off'}"
    row = Row("b", f"{model.label}, 1 rank, ZeRO-2, batch {batch}, gradient checkpointing {'on' if ckpt else 'off'}")
    if timeout <= 0:
        return row
    res, row.log, row.seconds = train_in_wrapper(
        work, name, b_args(work, root, model, name, batch, 1, "micro", ckpt, steps, steps // 2), timeout, env)
    metrics = read_metrics(work / "out" / name)
    last = next((m for m in reversed(metrics) if "tokens_per_s" in m), None)
    if res.get("rc") != 0 or last is None:
        row.ok = False
        row.figures = ("timed out" if res.get("timed_out") else "out of memory" if res.get("oom")
                       else res.get("error") or f"exit {res.get('rc')}")
        return row
    finite = all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    peak, source = _peak(metrics, res)
    row.ok = finite and len(metrics) == steps
    mfu = f"MFU {last['mfu']:.1%}" if "mfu" in last else "MFU n/a (unknown GPU: set train.peak_tflops)"
    row.figures = (f"{last['tokens_per_s']:,.0f} tokens/s, {last['samples_per_s']:.1f} samples/s, {mfu}, "
                   f"peak {peak} ({source}); last {steps - steps // 2} of {steps} steps"
                   + ("" if finite else "; NON-FINITE loss"))
    row.detail = {"last": last, "peak": peak}
    return row


def _peak(metrics: list[dict], res: dict) -> tuple[str, str]:
    logged = [m["peak_mem_gb"] for m in metrics if isinstance(m.get("peak_mem_gb"), (int, float))]
    if logged:
        return f"{max(logged):.1f} GB", "trainer's peak_mem_gb"
    if "peak_mem_bytes" in res:
        return (f"{res['peak_mem_bytes'] / 2**30:.1f} GiB ({res['peak_reserved_bytes'] / 2**30:.1f} reserved)",
                "torch.cuda.max_memory_allocated, read in the training process after the run")
    return "n/a", "not measured"


def search_row(work: Path, root: Path, model: Model, clock: Clock, micro: int, start_batch: int, cap: int,
               env) -> Row:
    """Gradient caching: double the global (= contrastive) batch at a fixed micro-batch until OOM, the cap or
    the time left; 2 steps a try."""
    row = Row("b", f"{model.label}, gradient caching (micro-batch {micro}): largest contrastive batch, "
                   f"{start_batch} doubled up to {cap}")
    start = time.monotonic()
    reached, tried, stop, last_seconds, peak = 0, [], "cap", 0.0, "n/a"
    batch = start_batch
    while batch <= cap:
        left = clock.timeout(600)
        if last_seconds and left < 1.8 * last_seconds:
            stop = f"time (next try needs ~{1.8 * last_seconds:.0f} s, {left:.0f} s left)"
            break
        if left < 30:
            stop = "time"
            break
        name = f"b-search-{batch}"
        res, row.log, last_seconds = train_in_wrapper(
            work, name, b_args(work, root, model, name, batch, batch // micro, "step", False, 2, 1), left, env)
        metrics = read_metrics(work / "out" / name)
        if res.get("rc") == 0 and len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics):
            reached = batch
            peak = _peak(metrics, res)[0]
            tried.append(f"{batch}: {last_seconds:.0f} s")
        else:
            what = ("OOM" if res.get("oom") else "timed out" if res.get("timed_out")
                    else res.get("error") or f"exit {res.get('rc')}")
            tried.append(f"{batch}: {what}")
            stop = "OOM" if res.get("oom") else "timed out" if res.get("timed_out") else "failed"
            break
        batch *= 2
    row.seconds = time.monotonic() - start
    # Stopping at OOM, the cap or the time left is the search's answer; a try that fails otherwise is not.
    row.ok = reached > 0 and stop != "failed"
    row.figures = (f"{reached or 'none'} pairs per step (stopped: {stop}; peak at the largest {peak}); "
                   f"tries {'; '.join(tried)}")
    return row


# --- part c -------------------------------------------------------------------------------------------


def inference_child(result: Path, root: Path, n_items: int, n_pope: int, preset: str) -> int:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from export import items as shapes_items  # benchmarks/export.py: shapes images and detailed captions

    from cafe_core.config import ExportConfig, GenerationConfig, ModelConfig, load_config
    from cafe_core.evaluate import sets as eval_sets
    from cafe_core.evaluate.export import embed_items
    from cafe_core.evaluate.generate import generate_answers
    from cafe_core.model.build import build
    from cafe_core.model.inputs import InputBuilder
    from cafe_core.model.joint import CafeModel
    from cafe_core.storage import Storage

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    # What load_for_inference does for a checkpoint, here for the random-init preset: bf16 on a GPU.
    start = time.monotonic()
    hf, processor = build(ModelConfig(preset=preset, dtype="bfloat16" if gpu else "float32"))
    model = CafeModel(hf).to(device).eval()
    load_s = time.monotonic() - start
    e, g = ExportConfig(), GenerationConfig()
    builder = InputBuilder(processor, e.prompts, MAX_LENGTH_0_5B)
    data = shapes_items(n_items)
    embed_items(model, builder, data[:8] + data[-8:], e.batch_size, device)  # warm-up
    sync()
    start = time.monotonic()
    emb = embed_items(model, builder, data, e.batch_size, device)
    sync()
    export_s = time.monotonic() - start
    pope_uri = load_config(str(CONFIG), [f"root={root}", "run_id=data"]).eval_sets.pope  # the synthetic POPE set
    splits = eval_sets.load_pope(Storage(), pope_uri, max_items=math.ceil(n_pope / 3))
    questions = [q for qs in splits.values() for q in qs][:n_pope]
    left = InputBuilder(processor, e.prompts, 1 << 16, padding_side="left")
    pope_items = [(q.question + g.pope_suffix, q.image) for q in questions]
    generate_answers(hf, left, pope_items[:4], g.max_new_tokens, g.batch_size, progress=False)  # warm-up
    sync()
    start = time.monotonic()
    answers = generate_answers(hf, left, pope_items, g.max_new_tokens, g.batch_size, progress=False)
    sync()
    pope_s = time.monotonic() - start
    result.write_text(json.dumps({
        "load_s": load_s, "items": len(data), "export_s": export_s, "export_batch": e.batch_size,
        "finite": bool(torch.isfinite(emb).all()), "dim": emb.shape[1], "answers": len(answers),
        "pope_s": pope_s, "pope_batch": g.batch_size, "max_new_tokens": g.max_new_tokens,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if gpu else None,
    }))
    return 0


def part_c(work: Path, root: Path, model: Model, n_items: int, n_pope: int, timeout: float, env) -> list[Row]:
    export = Row("c", f"export: embed_items over {n_items} items ({model.label})")
    pope = Row("c", f"POPE: generate_answers for {n_pope} questions ({model.label})")
    if timeout <= 0:
        return [export, pope]
    result = work / "out" / "c.result.json"
    result.unlink(missing_ok=True)
    log = work / "logs" / "c-inference.log"
    rc, seconds = run_logged([sys.executable, str(Path(__file__).resolve()), "--inference-child", str(result),
                              "--root", str(root), "--items", str(n_items), "--pope", str(n_pope), "--preset",
                              model.preset], log, timeout, env)
    export.log = pope.log = log
    export.seconds = pope.seconds = seconds
    if rc != 0 or not result.exists():
        export.ok = pope.ok = False
        export.figures = pope.figures = "timed out" if rc is None else f"exit {rc}"
        return [export, pope]
    r = json.loads(result.read_text())
    export.ok = r["finite"] and r["items"] == n_items
    export.figures = (f"{r['items'] / r['export_s']:,.1f} items/s ({r['export_s']:.1f} s, batch "
                      f"{r['export_batch']}, dim {r['dim']}{'' if r['finite'] else ', NON-FINITE embeddings'}); "
                      f"model build {r['load_s']:.0f} s")
    pope.ok = r["answers"] == n_pope
    pope.figures = (f"{r['answers'] / r['pope_s']:,.1f} answers/s ({r['pope_s']:.1f} s, batch {r['pope_batch']}, "
                    f"{r['max_new_tokens']} new tokens)"
                    + (f"; peak {r['peak_mem_bytes'] / 2**30:.1f} GiB" if r["peak_mem_bytes"] else ""))
    return [export, pope]


# --- the table ----------------------------------------------------------------------------------------


def progress(clock: Clock, rows: list[Row]) -> None:
    """One line per finished part, so that a watcher sees where the time goes before the table."""
    done = ", ".join(f"{r.part} {r.status} {r.seconds:.0f} s" for r in rows)
    print(f"[{clock.elapsed():4.0f} s] {done}", flush=True)


def print_table(rows: list[Row], header: str) -> None:
    print(f"\n{header}")
    width = max(len(r.name) for r in rows)
    print(f"{'part':<4} {'check':<{width}} {'result':<14} {'s':>5}  figures")
    for r in rows:
        print(f"{r.part:<4} {r.name:<{width}} {r.status:<14} {r.seconds:5.0f}  {r.figures}")
    for r in rows:
        if r.ok is False and r.log:
            print(f"\n{r.status}: {r.part} {r.name}\n  log {r.log}, last lines:\n{tail(r.log)}")


def check(args) -> int:
    gpu = not args.cpu
    clock = Clock(None if args.cpu else args.budget)
    work = Path(args.work).resolve()
    marker = work / ".cafe-gpu-check"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        print(f"error: --work {work} is not empty and was not made by this check: give another folder", file=sys.stderr)
        return 2
    shutil.rmtree(work, ignore_errors=True)  # a fresh start: no resumed runs, no reused data
    work.mkdir(parents=True)
    marker.touch()
    env = child_env(work)
    root = work / "root"
    device = "CPU"
    if gpu:  # asked in a child: this process keeps no CUDA context of its own on the GPU the runs share
        probe = _run_quiet([sys.executable, "-c", "import torch; p = torch.cuda.get_device_properties(0); "
                            "print(f'{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}')"])
        if probe.returncode != 0:
            print(f"error: no GPU visible to torch (use --cpu for the plumbing test):\n{probe.stderr[-1500:]}",
                  file=sys.stderr)
            return 2
        device = probe.stdout.strip()
    parts = set(args.parts or ("a" if args.cpu else "abc"))
    model = Model(args.preset, gpu)
    rows: list[Row] = []
    # Data: enough pairs for the search's largest global batch on the GPU; POPE images for 300 questions.
    train_size = max(2 * args.search_cap, 200) if "b" in parts else 64 if args.cpu else 200
    rows.append(prepare_data(work, root, train_size, 2 if args.cpu else 50, clock.timeout(120, 300), env))
    data_ok = rows[-1].ok
    progress(clock, rows[-1:])
    if "a" in parts:
        runs = ([ARun(2, "micro", 1)] if args.cpu else
                [ARun(2, "micro", 1), ARun(3, "micro", 1), ARun(2, "step", 2), ARun(3, "step", 2)])
        if data_ok:
            rows += part_a(work, root, runs, gpu, args.steps, clock.timeout(240, 240 if gpu else 0), env)
            progress(clock, rows[-len(runs):])
        else:
            rows += [Row("a", f"ZeRO-{r.zero} {r.contrastive}") for r in runs]
    if "b" in parts:
        for ckpt in (False, True):
            timeout = clock.timeout(150, 120 + (0 if ckpt else 90)) if data_ok else 0
            rows.append(throughput_row(work, root, model, ckpt, args.b_batch, args.b_steps, timeout, env))
            progress(clock, rows[-1:])
    if "c" in parts:
        rows += part_c(work, root, model, args.items, args.pope, clock.timeout(150, 60) if data_ok else 0, env)
        progress(clock, rows[-2:])
    if "b" in parts:  # last: it takes the time that is left; shown with part b
        search = (search_row(work, root, model, clock, args.b_batch, args.search_start, args.search_cap, env)
                  if data_ok else Row("b", "gradient caching: largest contrastive batch"))
        rows.insert(-2 if "c" in parts else len(rows), search)
        progress(clock, [search])
    total = clock.elapsed()
    if clock.deadline is not None:
        rows.append(Row("-", f"whole check under {args.budget:.0f} s (set-up included)", total <= args.budget,
                        f"{total:.0f} s", total))
    print_table(rows, f"GPU acceptance check ({'--cpu plumbing test' if args.cpu else 'GPU'}) on {device}; "
                      f"work dir {work}; {total:.0f} s in all")
    if args.json:
        records = [{k: v for k, v in r.__dict__.items() if k != "log"} | {"status": r.status} for r in rows]
        Path(args.json).write_text(json.dumps(records, indent=2, default=str))
    failed = [r for r in rows if not r.ok]
    print(f"\n{'FAILED: ' + str(len(failed)) + ' of ' + str(len(rows)) + ' rows' if failed else 'all rows passed'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-child"]:  # internal: one `cafe train` in this process, peak memory reported
        return train_child(Path(argv[1]), argv[3:] if argv[2:3] == ["--"] else argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true",
                   help="set up .gpu-venv from gpu-wheels/ offline, then run the check in it")
    p.add_argument("--install-only", action="store_true", help="set up .gpu-venv and stop")
    p.add_argument("--venv", default=str(VENV), help="the virtual environment --install makes (default %(default)s)")
    p.add_argument("--wheels", metavar="DIR", help="download and slim the wheels into DIR (make gpu-wheels) and stop")
    p.add_argument("--python-version", default="3.11", help="the GPU machine's Python, for --wheels (default 3.11)")
    p.add_argument("--cpu", action="store_true", help="the plumbing test: part a only, on the CPU with gloo, one row")
    p.add_argument("--parts", help="which parts to run (default abc on the GPU, a with --cpu; b and c on the CPU are "
                                   "a dry run of the code paths, with --preset tiny)")
    p.add_argument("--preset", default=PRESET_0_5B, help="parts b and c's model preset (default %(default)s)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cafe-gpu-check"),
                   help="scratch folder, emptied first (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="part a's steps (20 on the GPU, 4 with --cpu)")
    p.add_argument("--b-batch", type=int, default=8, help="part b's global batch (= the search's micro-batch)")
    p.add_argument("--b-steps", type=int, default=10, help="part b's steps; throughput is the second half's")
    p.add_argument("--search-start", type=int, default=64)
    p.add_argument("--search-cap", type=int, default=512)
    p.add_argument("--items", type=int, default=2000, help="part c's export items")
    p.add_argument("--pope", type=int, default=300, help="part c's POPE questions")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check, set-up included")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--inference-child", metavar="RESULT", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inference_child:
        return inference_child(Path(args.inference_child), Path(args.root), args.items, args.pope, args.preset)
    if args.wheels:
        return build_wheels(Path(args.wheels).resolve(), args.python_version)
    if args.install or args.install_only:
        os.environ.setdefault(T0_ENV, str(time.time()))
        python = install(WHEELS, Path(args.venv).resolve())
        if args.install_only:
            return 0
        rest = [a for a in argv if a not in ("--install", "--install-only")]
        os.execve(str(python), [str(python), str(Path(__file__).resolve()), *rest], os.environ)
    if args.steps is None:
        args.steps = 4 if args.cpu else 20
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
