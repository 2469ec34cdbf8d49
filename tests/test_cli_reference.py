"""host/CLI.md is exactly what the parser says (regenerate with `python -m host.cli_reference > host/CLI.md`)."""

from pathlib import Path

from host.cli_reference import render


def test_cli_reference_is_current() -> None:
    committed = (Path(__file__).resolve().parent.parent / "host" / "CLI.md").read_text()
    assert committed == render(), "host/CLI.md is stale: run `python -m host.cli_reference > host/CLI.md`"
