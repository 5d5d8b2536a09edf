"""The repository's tools/ scripts, loaded as modules for a test to call their functions.

tools/ is no package (its scripts run as ``python tools/NAME.py``), so a test loads one by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TOOLS = Path(__file__).resolve().parent.parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/NAME.py as the module ``dls_tool_NAME`` (once per process: a second call returns the same)."""
    module_name = f"dls_tool_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"no tools/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before running it: dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
