"""The ``torpor`` command line: one module per group of commands (see ``torpor --help``)."""

from host.cli.app import main

__all__ = ["main"]
