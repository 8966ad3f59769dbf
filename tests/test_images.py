"""The Dockerfiles in images/, checked by parsing (no Docker engine runs here): versions come from constraints.txt,
torch 2.13.0 without torchvision, Python as pyproject and constraints expect, CUDA matching torch's wheel index,
and every COPY source present in the build context."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"base": ROOT / "images/base/Dockerfile", "train": ROOT / "images/train/Dockerfile"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    out, buf, start = [], [], 0
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        text = " ".join(p for p in buf if p)
        buf = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, f"{path}: dangling line continuation"
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def shell_commands(run: str) -> list[list[str]]:
    """A RUN line split into simple commands at &&, ||, ; and |."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                       "-f", "--find-links", "--trusted-host", "-e", "--editable", "--target", "-t", "--prefix",
                       "--root", "--platform", "--python-version", "--only-binary", "--no-binary", "--progress-bar"}


@dataclass
class PipInstall:
    line: int
    options: dict[str, list[str]]
    requirements: list[str]

    @property
    def constrained(self) -> bool:
        return any(Path(c).name == "constraints.txt" for c in self.options.get("-c", []))


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for cmd in shell_commands(ins.args):
            # pip / pip3 / python -m pip / /opt/venv/bin/pip, then "install"
            for i, tok in enumerate(cmd[:-1]):
                if (Path(tok).name in ("pip", "pip3", "pip3.11") or (tok == "pip" and i > 0 and cmd[i - 1] == "-m")) \
                        and cmd[i + 1] == "install":
                    args = cmd[i + 2:]
                    break
            else:
                continue
            options: dict[str, list[str]] = {}
            reqs: list[str] = []
            it = iter(args)
            for arg in it:
                key, eq, value = arg.partition("=")
                if arg.startswith("-") and key in _OPTIONS_WITH_VALUE:
                    key = {"--constraint": "-c", "--requirement": "-r", "--index-url": "-i"}.get(key, key)
                    options.setdefault(key, []).append(value if eq else next(it))
                elif arg.startswith("-"):
                    options.setdefault(arg, [])
                else:
                    reqs.append(arg)
            found.append(PipInstall(ins.line, options, reqs))
    return found


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[Instruction]]:
    path = DOCKERFILES[request.param]
    assert path.is_file(), f"{path} is missing"
    return request.param, parse_dockerfile(path)


def test_every_pip_install_uses_the_constraints(dockerfile):
    name, instructions = dockerfile
    pins = constraints()
    installs = pip_installs(instructions)
    assert installs, f"{name}: no pip install found"
    for pip in installs:
        where = f"images/{name}/Dockerfile line {pip.line}"
        assert "-r" not in pip.options or pip.constrained, f"{where}: -r without -c constraints.txt"
        assert "-U" not in pip.options and "--upgrade" not in pip.options, f"{where}: --upgrade ignores the pins"
        for spec in pip.requirements:
            if spec == ".":   # the project itself: its dependencies come through the constraints
                assert pip.constrained, f"{where}: the project installed without -c constraints.txt"
                continue
            req = Requirement(spec)
            key = canonicalize_name(req.name)
            if not pip.constrained:
                assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", \
                    f"{where}: {spec!r} is neither pinned with == nor installed with -c constraints.txt"
            for s in req.specifier:
                assert s.operator == "==", f"{where}: {spec!r}: pin with ==, as constraints.txt does"
                assert key in pins, f"{where}: {req.name} is not in constraints.txt"
                assert s.version == pins[key], \
                    f"{where}: {req.name}=={s.version} but constraints.txt has {pins[key]}"


def test_torch_is_the_constraints_version_and_no_torchvision(dockerfile):
    name, instructions = dockerfile
    pins = constraints()
    assert pins["torch"] == "2.13.0"
    torch = [r for p in pip_installs(instructions) for r in p.requirements
             if r != "." and canonicalize_name(Requirement(r).name) == "torch"]
    assert torch == ["torch==2.13.0"], f"{name}: torch must be installed once, as torch==2.13.0 (got {torch})"
    text = " ".join(i.args for i in instructions).lower()   # comments are not instructions
    for banned in ("torchvision", "torchaudio"):
        assert banned not in text, f"images/{name}/Dockerfile installs {banned}; images are processed with Pillow"


def test_torch_comes_from_the_matching_pytorch_index(dockerfile):
    name, instructions = dockerfile
    [torch_install] = [p for p in pip_installs(instructions) if "torch==2.13.0" in p.requirements]
    [index] = torch_install.options.get("-i", [None])
    assert index and index.startswith("https://download.pytorch.org/whl/"), f"{name}: torch from {index}"
    flavour = index.rstrip("/").rsplit("/", 1)[1]
    if name == "base":
        assert flavour == "cpu"
    else:
        assert re.fullmatch(r"cu\d{3}", flavour), flavour
        [base] = [i.args for i in instructions if i.keyword == "FROM"]
        m = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
        assert m, f"train image base {base!r}: expected nvidia/cuda:12.x.y-..."
        assert m.group(1) == "12", "CUDA 12.x"
        assert flavour == f"cu{m.group(1)}{m.group(2)}", \
            f"base image CUDA {m.group(1)}.{m.group(2)} but torch from the {flavour} index"
        assert "devel" in base, "DeepSpeed's JIT ops need nvcc and the CUDA headers: use a -devel base"


def test_python_version_matches_pyproject_and_constraints(dockerfile):
    name, instructions = dockerfile
    text = "\n".join(f"{i.keyword} {i.args}" for i in instructions)
    if name == "base":
        [base] = [i.args for i in instructions if i.keyword == "FROM"]
        m = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?", base)
        assert m, f"base image {base!r}: expected python:3.X-slim"
        version = m.group(1)
    else:
        versions = set(re.findall(r"\bpython(\d+\.\d+)\b", text))
        assert len(versions) == 1, f"train image: one Python version expected, found {versions}"
        [version] = versions
        assert f"python{version} -m venv" in text, "the train image installs into a venv of that Python"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{version}.0"), \
        f"{name}: Python {version} does not satisfy requires-python"
    header = (ROOT / "constraints.txt").read_text().splitlines()[0]
    assert f"Python {version}" in header, f"constraints.txt is resolved for another Python: {header!r}"


def test_deepspeed_at_the_constraints_version_with_jit_ops():
    instructions = parse_dockerfile(DOCKERFILES["train"])
    pins = constraints()
    deps = {canonicalize_name(Requirement(d).name) for d in pyproject()["project"]["dependencies"]}
    installs = pip_installs(instructions)
    pinned = [p for p in installs for r in p.requirements if r != "." and Requirement(r).name == "deepspeed"]
    via_project = [p for p in installs if "." in p.requirements and p.constrained]
    if pinned:
        assert [r for p in pinned for r in p.requirements if r.startswith("deepspeed")] == \
            [f"deepspeed=={pins['deepspeed']}"]
    else:
        assert via_project and "deepspeed" in deps and "deepspeed" in pins, \
            "the train image must install deepspeed, pinned or through the project with -c constraints.txt"
    # DS_BUILD_OPS=0 is set before the install that brings DeepSpeed.
    install_line = (pinned or via_project)[0].line
    env_before = " ".join(i.args for i in instructions if i.keyword == "ENV" and i.line < install_line)
    assert re.search(r"\bDS_BUILD_OPS=0\b", env_before), "set DS_BUILD_OPS=0 (JIT ops) before installing deepspeed"
    assert "libaio" in " ".join(i.args for i in instructions if i.keyword == "RUN"), "libaio for DeepSpeed async I/O"


def test_base_image_carries_kfp_for_the_components():
    """The Python-function components run with install_kfp_package=False: kfp must come with the project."""
    deps = {canonicalize_name(Requirement(d).name) for d in pyproject()["project"]["dependencies"]}
    assert {"kfp", "kfp-kubernetes"} <= deps
    assert any("." in p.requirements and p.constrained for p in pip_installs(parse_dockerfile(DOCKERFILES["base"])))


def test_layout_user_and_code_version(dockerfile):
    name, instructions = dockerfile
    assert [i.args for i in instructions if i.keyword == "WORKDIR"][-1] == "/app"
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: run as a non-root user"
    args = " ".join(i.args for i in instructions if i.keyword == "ARG")
    envs = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert re.search(r"\bCAFE_CODE_VERSION\b", args), f"{name}: ARG CAFE_CODE_VERSION"
    assert "CAFE_CODE_VERSION=${CAFE_CODE_VERSION}" in envs, f"{name}: ENV CAFE_CODE_VERSION from the build arg"
    copies = [shlex.split(i.args) for i in instructions if i.keyword == "COPY"]
    assert ["configs", "./configs"] in copies, f"{name}: configs/ to /app/configs"


def test_every_package_of_the_project_is_copied_before_it_is_installed(dockerfile):
    """`pip install .` packages what setuptools finds (pyproject's packages.find include): each of those folders must
    be in the image by then, or the installed project silently lacks it."""
    name, instructions = dockerfile
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.split(".")[0].rstrip("*") for pattern in include})
    [install] = [p for p in pip_installs(instructions) if "." in p.requirements]
    copied = {str(Path(src)) for i in instructions if i.keyword == "COPY" and i.line < install.line
              for src in [a for a in shlex.split(i.args) if not a.startswith("--")][:-1]}
    for needed in [*packages, "pyproject.toml", "constraints.txt", "README.md"]:
        assert needed in copied, f"images/{name}/Dockerfile: COPY {needed} before `pip install .` (line {install.line})"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for plain names and **/ globs: a path is excluded with any parent, the last
    matching pattern wins, `!` re-includes. (fnmatch's * also crosses /, so this errs towards "excluded".)"""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        globs = [pat[3:], "*/" + pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    name, instructions = dockerfile
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert ins.keyword == "COPY", f"{name} line {ins.line}: use COPY, not ADD"
        args = [a for a in shlex.split(ins.args) if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(ins.args)), "no multi-stage copies expected"
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"images/{name}/Dockerfile line {ins.line}: COPY {src}: not in the repo"
            assert not _dockerignored(str(Path(src)), patterns), \
                f"images/{name}/Dockerfile line {ins.line}: COPY {src} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".venv", ".cafe", ".git", ".pytest_cache", "cafe_core/__pycache__", "cafe_core/x.pyc",
                 "cafe.egg-info"):
        assert _dockerignored(path, patterns), f".dockerignore should exclude {path}"
    for path in ("cafe_core/storage.py", "configs/local.yaml", "constraints.txt", "pyproject.toml", "README.md"):
        assert not _dockerignored(path, patterns), f".dockerignore must not exclude {path}"


def test_parser_sees_through_continuations_and_comments(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("FROM python:3.11-slim\n# c\nRUN pip install \\\n    # inner comment\n    -c constraints.txt . "
                 "&& pip install --index-url https://x/cpu torch==2.13.0 ; python -m pip install a==1\n")
    ins = parse_dockerfile(f)
    assert [i.keyword for i in ins] == ["FROM", "RUN"]
    pips = pip_installs(ins)
    assert [(p.requirements, p.constrained) for p in pips] == [(["."], True), (["torch==2.13.0"], False),
                                                               (["a==1"], False)]
    assert pips[1].options["-i"] == ["https://x/cpu"]
