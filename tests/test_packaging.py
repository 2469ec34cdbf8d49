"""What a non-editable install (``pip install .``, a wheel) carries: every file of the
packages that is not Python source and not a document is matched by a ``package-data``
pattern, so the installed host finds the sources it compiles on first use (the Python guest
runtime's ``runtime.c`` was left out once, and ``torpor build`` of a Python agent failed
with an internal error on every installed copy but an editable one)."""

from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_data_file_of_the_packages_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns: dict[str, list[str]] = config["package-data"]
    excluded = config["packages"]["find"]["exclude"]
    tracked = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "guest_sdk/python/runtime.c" in tracked
    missing = []
    for path in tracked:
        package, _, rest = path.partition("/")
        if path.endswith((".py", ".md")) or any(fnmatch.fnmatch(path.replace("/", "."), e) for e in excluded):
            continue  # Python source goes in as modules; documents are not read at run time
        # setuptools matches a pattern within each directory level: "*" does not cross a "/"
        if not any(fnmatch.fnmatch(rest, p) and rest.count("/") == p.count("/") for p in patterns[package]):
            missing.append(path)
    assert missing == [], f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"


def test_a_guest_runtime_built_on_first_use_says_so_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first ``torpor build`` of a JS or Python agent on a machine builds its runtime (a minute
    or more): one line before, naming what and where it is cached, one after; nothing once cached."""
    from host.sandbox import guest_runtime_build as grb

    path = tmp_path / "cache" / "runtime.wasm"
    path.parent.mkdir()
    built = grb.cached_module(path, lambda: b"\0asm", what="the X runtime (from its sdist; a while)")
    assert built == b"\0asm" and path.read_bytes() == b"\0asm"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"torpor: building the X runtime (from its sdist; a while), once for this machine (cached in {path.parent})"
    assert lines[1].startswith("torpor: built the X runtime in ") and len(lines) == 2
    assert grb.cached_module(path, lambda: b"other", what="the X runtime") == b"\0asm"
    assert capsys.readouterr().err == ""
