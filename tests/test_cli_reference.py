"""host/cli/CLI.md is exactly what the parser says (regenerate with `python -m host.cli.reference > host/cli/CLI.md`)."""

from pathlib import Path

from host.cli.reference import render


def test_cli_reference_is_current() -> None:
    committed = (Path(__file__).resolve().parent.parent / "host" / "cli" / "CLI.md").read_text()
    assert committed == render(), "host/cli/CLI.md is stale: run `python -m host.cli.reference > host/cli/CLI.md`"
