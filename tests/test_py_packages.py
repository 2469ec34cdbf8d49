"""What a Python agent can import, said at build time: a C extension it vendors, or a
package it neither vendors nor finds in the runtime's frozen standard library, fails
``torpor build`` with the agent's line and what to do (issue 26, item 3). Every case is a
real build: the agent's top level runs in the CPython runtime, which raises the import
error the host then explains. (A vendored pure-Python package that builds and runs:
tests/test_py_gather.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES

from host.errors import ToolchainError
from host.sandbox import bundle as bundle_mod
from host.sandbox import py_runtime


def agent(tmp_path: Path, source: str, files: dict[str, bytes] | None = None) -> Path:
    d = tmp_path / "agent"
    d.mkdir()
    (d / "policy.toml").write_text((EXAMPLES / "steps-py" / "policy.toml").read_text())
    (d / "agent.py").write_text(source)
    for name, data in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return d


def test_a_vendored_c_extension_is_a_clear_build_error(tmp_path: Path) -> None:
    """A package whose ``__init__`` imports its compiled speed-up: the build names the
    ``.so`` and says why it cannot load (a wheel for another platform, vendored as is)."""
    d = agent(tmp_path, "import torpor\nimport fastjson\n\nasync def main():\n    return fastjson.dumps(1)\n", {
        "fastjson/__init__.py": b"from ._speedups import dumps\n",
        "fastjson/_speedups.cpython-311-x86_64-linux-gnu.so": b"\x7fELF" + bytes(60),
    })
    with pytest.raises(ToolchainError) as info:
        bundle_mod.build_dir(d)
    msg = str(info.value)
    assert "fastjson/__init__.py:1: ModuleNotFoundError: No module named 'fastjson._speedups'" in msg, msg
    assert "fastjson/_speedups.cpython-311-x86_64-linux-gnu.so is a C extension" in msg
    assert "loads no native code" in msg


@pytest.mark.parametrize(("source", "missing"), [
    ("import numpy\n", "numpy"),
    ("import torpor\nimport zlib\n", "zlib"),  # a C module of the standard library the runtime lacks
])
def test_a_package_that_is_not_there_says_what_can_be_imported(tmp_path: Path, source: str, missing: str) -> None:
    d = agent(tmp_path, source + "\nasync def main():\n    pass\n")
    with pytest.raises(ToolchainError, match=rf"agent\.py:\d: ModuleNotFoundError: No module named '{missing}' "
                                             r"\(a Python agent imports the standard library frozen into the runtime"):
        bundle_mod.build_dir(d)


def test_native_files_are_found_by_module_name(tmp_path: Path) -> None:
    d = agent(tmp_path, "", {"pkg/_a.cpython-311-x86_64-linux-gnu.so": b"", "pkg/sub/_b.pyd": b"", "top.so": b"",
                             ".venv/x.so": b"", "pkg/notes.txt": b""})
    assert py_runtime._native_modules(d) == {"pkg._a": "pkg/_a.cpython-311-x86_64-linux-gnu.so",
                                             "pkg.sub._b": "pkg/sub/_b.pyd", "top": "top.so"}
