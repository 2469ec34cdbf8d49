"""Where a Torpor store lives when no ``--store`` is given.

On the floor of ``host/`` (beside :mod:`host.errors` and :mod:`host.ids`): the CLI,
the runtime and the credential broker all need the same answer, and none of them may
import another for it.
"""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "TORPOR_STORE"


def default_store_dir() -> Path:
    """``$TORPOR_STORE`` or the user's data directory (``~/.local/share/torpor/store`` on Linux)."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env)
    import platformdirs  # only when the environment does not say: it is most of this module's import

    return Path(platformdirs.user_data_dir("torpor")) / "store"
