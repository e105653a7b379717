"""Config files that build on other config files.

``configs/*.py`` are read by path (``--config=configs/x.py``), not imported as a package, so a
config that starts from another one (``configs/mqar_cpu_all.py`` from ``configs/mqar_cpu.py``)
cannot rely on ``configs`` being importable: a console script such as ``jaxbased-mqar`` has its
own ``bin`` folder, not the working directory, on ``sys.path``. :func:`sibling_get_config` finds
the other file beside the calling one instead.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any


def sibling_get_config(this_file: str, name: str) -> Callable[..., Any]:
    """The ``get_config`` of ``<name>.py`` in the folder of ``this_file``.

    Raises ``ValueError`` naming the path when that file does not exist or defines no
    ``get_config``.
    """
    path = Path(this_file).resolve().with_name(f"{name}.py")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} (for {name!r}) does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {str(path)!r} defines no get_config()")
    return get_config
