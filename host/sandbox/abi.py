"""Guest ABI v1, as constants the host checks against (``guest_sdk/ABI.md`` is the prose).

One place for names, codes and limits, so the linker, the tool dispatcher and
the bundle validator cannot drift apart.
"""

from __future__ import annotations

from typing import Final

ABI_VERSION: Final = 1
SUPPORTED_ABI_VERSIONS: Final = frozenset({1})
ABI_SECTION: Final = "torpor.abi"
#: A module may ask for a finer granularity of its checkpoints' memory deltas (ASCII
#: bytes, one of CHUNK_SIZES): a pre-initialised heap (a JS agent's) differs from its
#: image by a few bytes on many pages, and a 1 KiB chunk carries a quarter of a page's
#: zeros through the scan, the compressor and the restore. Without it, 4 KiB.
CHUNK_SECTION: Final = "torpor.chunk"
CHUNK_SIZES: Final = (256, 512, 1024, 2048, 4096)

IMPORT_MODULE: Final = "torpor"
ENTRY_EXPORT: Final = "torpor_main"
MEMORY_EXPORT: Final = "memory"
ASYNC_BUF_EXPORT: Final = "__torpor_async"
GLOBAL_EXPORT_PREFIX: Final = "torpor.g"

# Imports every agent may use: they touch nothing but the agent's own input,
# output and log. ``tool_call`` is defined only when the policy grants a tool.
CORE_IMPORTS: Final = frozenset(
    {"input_len", "input_read", "output_write", "log", "response_len", "response_read", "abort"}
)
TOOL_IMPORT: Final = "tool_call"
SUSPENDING_IMPORTS: Final = (f"{IMPORT_MODULE}.{TOOL_IMPORT}",)

# Signatures as (number of i32 parameters, number of i32 results): every import of
# the ABI, and every export the host calls, takes and returns i32s only.
IMPORT_SIGNATURES: Final[dict[str, tuple[int, int]]] = {
    "input_len": (0, 1),
    "input_read": (2, 1),
    "output_write": (2, 1),
    "log": (3, 1),
    "response_len": (0, 1),
    "response_read": (2, 1),
    "abort": (3, 0),
    TOOL_IMPORT: (4, 1),
}

# Binaryen's Asyncify controls, which the host calls at every suspension.
ASYNCIFY_SIGNATURES: Final[dict[str, tuple[int, int]]] = {
    "asyncify_start_unwind": (1, 0),
    "asyncify_stop_unwind": (0, 0),
    "asyncify_start_rewind": (1, 0),
    "asyncify_stop_rewind": (0, 0),
    "asyncify_get_state": (0, 1),
}
ASYNCIFY_EXPORTS: Final = tuple(ASYNCIFY_SIGNATURES)
INITIALIZE_EXPORT: Final = "_initialize"  # a WASI reactor's constructors, run once before the entry
STACK_POINTER_EXPORT: Final = "__stack_pointer"  # read when a memory fault may be a shadow-stack overflow (C, Zig)
#: Optional: the address of 8 bytes the host fills with the agent's seed before torpor_main
#: first runs (ABI.md section 6). The JS runtime seeds Math.random from it.
SEED_EXPORT: Final = "__torpor_seed"
SEED_BYTES: Final = 8


def agent_seed(agent_id: str) -> bytes:
    """An agent's seed: derived from its id, which its record keeps, so a replay or a
    resume on another host gives the guest the very same bytes."""
    import hashlib

    return hashlib.sha256(b"torpor.seed\0" + agent_id.encode()).digest()[:SEED_BYTES]

# Error codes a guest receives (negative i32) and their names in error objects.
E_FAULT: Final = -1
E_INVALID_JSON: Final = -2
E_TOO_LARGE: Final = -3
E_UNKNOWN_TOOL: Final = -4
E_INVALID_ARGS: Final = -5
E_TOOL_FAILED: Final = -6
E_DENIED: Final = -7
E_RESULT_TOO_LARGE: Final = -8
E_RATE_LIMITED: Final = -9
E_TIMEOUT: Final = -10
E_UNAVAILABLE: Final = -11

ERROR_CODES: Final[dict[str, int]] = {
    "fault": E_FAULT,
    "invalid_json": E_INVALID_JSON,
    "too_large": E_TOO_LARGE,
    "unknown_tool": E_UNKNOWN_TOOL,
    "invalid_args": E_INVALID_ARGS,
    "tool_failed": E_TOOL_FAILED,
    "denied": E_DENIED,
    "result_too_large": E_RESULT_TOO_LARGE,
    "rate_limited": E_RATE_LIMITED,
    "timeout": E_TIMEOUT,
    "unavailable": E_UNAVAILABLE,
}

ABORT_PANIC: Final = 0
ABORT_OOM: Final = 1

MAX_TOOL_NAME: Final = 128
MAX_ARGS: Final = 1 << 20
MAX_OUTPUT: Final = 1 << 20
MAX_LOG: Final = 64 << 10
MAX_RESPONSE: Final = 1 << 20
