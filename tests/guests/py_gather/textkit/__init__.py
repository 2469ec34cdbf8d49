"""A pure-Python package the agent vendors beside agent.py (bundled by torpor build)."""

from .slug import slugify

__all__ = ["VERSION", "slugify"]
VERSION = "1.0"
