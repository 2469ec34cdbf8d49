"""The one gate every module passes before Binaryen or Wasmtime sees it.

A module is untrusted bytes. The host relies on some of its exports (the entry
point, the memory, Asyncify's controls, the globals it snapshots) having exactly
the kind and type it calls them with: a global named like a function, or a global
of a type the host cannot read, crashed the process (SIGSEGV, SIGABRT) rather than
failing the agent. And Wasmtime allocates what a module declares (a 4 GiB initial
memory, a table of millions of entries) before anything can refuse it. So we read
the sections ourselves, from the headers, and check them against the guest ABI
(:mod:`host.sandbox.abi`), the host's limits (:class:`HostLimits`) and the policy's
memory budget, before anything is compiled, instantiated or allocated.

:func:`check_module` is the gate; :class:`ModuleShape` is what it read, and what
the engine builds a :class:`~host.sandbox.engine.LoadedModule` from instead of
asking Wasmtime (whose Python types for v128 or reference values abort).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from host.errors import ConfigError, ImportNotGranted, MemoryLimitError, ModuleError
from host.sandbox import abi, wasm_binary
from host.sandbox.wasm_binary import Reader
from policies import Policy

WASM_PAGE: Final = 65536
#: Memory an agent may have when its policy names no ``budgets.memory``.
DEFAULT_MEMORY: Final = 64 << 20
#: The operator's memory cap when ``Host(max_memory=)`` and ``--max-memory`` name none.
MAX_MEMORY_ENV: Final = "TORPOR_MAX_MEMORY"
WASI_MODULE: Final = "wasi_snapshot_preview1"

#: Value types the host can read, write and snapshot (the only ones a global may have).
NUMERIC: Final = ("i32", "i64", "f32", "f64")
_VALTYPES: Final = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref",
                    0x6F: "externref"}
_KINDS: Final = ("func", "table", "memory", "global", "tag")

# Section ids in the order the spec requires them (tags, 13, sit between memory and global).
_ORDER: Final = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 6, 6: 7, 7: 8, 8: 9, 9: 10, 12: 11, 10: 12, 11: 13}
_SECTION_NAMES: Final = {1: "type", 2: "import", 3: "function", 4: "table", 5: "memory", 6: "global",
                         7: "export", 8: "start", 9: "element", 10: "code", 11: "data", 12: "data count",
                         13: "tag"}


@dataclass(frozen=True)
class HostLimits:
    """What this host accepts from any module, whatever its policy says.

    Why: these bound what compiling and instantiating a module can cost before a
    budget applies. Far above what the toolchain's C agents use (an example agent:
    ~100 functions, ~20 KiB of code, one table of a few entries).
    """

    #: A Python agent that imports asyncio is ~18 MB (the interpreter and its heap).
    max_module_bytes: int = 32 << 20
    max_types: int = 10_000
    max_params: int = 1_000
    max_imports: int = 1_000
    max_functions: int = 100_000  # imported and defined
    max_function_body: int = 1 << 20
    max_code_bytes: int = 12 << 20
    max_tables: int = 4
    max_table_elements: int = 1 << 16  # a funcref is 8-16 bytes of host memory outside the linear memory
    max_globals: int = 10_000
    max_exports: int = 10_000
    max_element_segments: int = 10_000
    max_data_segments: int = 10_000
    max_memory_pages: int = 65_536  # 4 GiB, all a wasm32 memory can address


HOST_LIMITS: Final = HostLimits()


@dataclass(frozen=True)
class FuncSig:
    """A function type, as value type names."""

    params: tuple[str, ...]
    results: tuple[str, ...]

    def __str__(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    kind: str
    sig: FuncSig | None = None


@dataclass(frozen=True)
class Export:
    name: str
    kind: str
    index: int


@dataclass(frozen=True)
class Global:
    valtype: str
    mutable: bool


@dataclass(frozen=True)
class ModuleShape:
    """What :func:`check_module` read from a module that passed it."""

    size: int
    imports: tuple[Import, ...]
    exports: Mapping[str, Export]
    func_sigs: tuple[FuncSig, ...]  # every function, imported ones first
    globals: tuple[Global, ...]
    tables: tuple[tuple[int, int | None], ...]  # (initial, maximum) elements
    memory_pages: tuple[int, int | None]  # (initial, maximum) pages of the one memory
    code_bytes: int
    data_segments: int
    custom: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        """The initial size of the memory: what instantiating the module allocates."""
        return self.memory_pages[0] * WASM_PAGE

    def func_sig(self, name: str) -> FuncSig | None:
        e = self.exports.get(name)
        return self.func_sigs[e.index] if e is not None and e.kind == "func" else None

    @property
    def entry_results(self) -> int:
        sig = self.func_sig(abi.ENTRY_EXPORT)
        return len(sig.results) if sig is not None else 0

    @property
    def suspendable(self) -> bool:
        """Whether Asyncify's controls are exported (all of them: :func:`check_module` refuses a part)."""
        return all(name in self.exports for name in abi.ASYNCIFY_EXPORTS)

    @property
    def chunk_size(self) -> int:
        """The granularity of this module's checkpoint deltas (``abi.CHUNK_SECTION``;
        :func:`check_module` refused any other value than one of ``abi.CHUNK_SIZES``)."""
        raw = self.custom.get(abi.CHUNK_SECTION)
        return int(raw) if raw else 4096

    @property
    def has_initialize(self) -> bool:
        return self.func_sig(abi.INITIALIZE_EXPORT) is not None

    @property
    def snapshot_globals(self) -> tuple[tuple[str, str], ...]:
        """(export name, value type) of the mutable globals every capture saves."""
        out = []
        for name, e in self.exports.items():
            if e.kind == "global" and name.startswith(abi.GLOBAL_EXPORT_PREFIX):
                g = self.globals[e.index]
                if g.mutable:
                    out.append((name, g.valtype))
        return tuple(out)

    def check_memory(self, limit: int, *, policy_name: str = "", budget: int | None = None) -> None:
        """Refuse a module whose initial memory alone exceeds the agent's memory limit.

        Why before instantiating: the initial memory is allocated (and for the
        pristine image, copied) in full before any store limit could refuse it.
        ``budget``: the policy's own budget, when the operator's cap (``limit``) is
        below it; the error then names both, and says the operator's cap refused it
        (:class:`OperatorMemoryCap`: the agent is not damaged, only not runnable here).
        """
        if self.memory_bytes <= limit:
            return
        whose = f"policy `{policy_name}`'s" if policy_name else "the agent's"
        initial = f"the module's initial memory is {self.memory_pages[0]} pages ({_mib(self.memory_bytes)})"
        if budget is not None and self.memory_bytes <= budget:
            raise OperatorMemoryCap(
                f"{initial}, above this host's memory cap of {_mib(limit)} (--max-memory, ${MAX_MEMORY_ENV}); "
                f"{whose} memory budget is {_mib(budget)} (budgets.memory)")
        raise MemoryLimitError(f"{initial}, above {whose} memory budget of {_mib(budget or limit)} (budgets.memory)"
                               + (f" and this host's memory cap of {_mib(limit)} (--max-memory, ${MAX_MEMORY_ENV})"
                                  if budget is not None else ""))

    def check_imports(self, granted_tools: bool, wasi_allow: frozenset[str], policy_name: str) -> None:
        """Refuse, before anything runs, a module importing what the policy does not grant."""
        for imp in self.imports:
            mod, name, kind = imp.module, imp.name, imp.kind
            if mod == abi.IMPORT_MODULE and kind == "func":
                if name in abi.CORE_IMPORTS:
                    continue
                if name == abi.TOOL_IMPORT:
                    if granted_tools:
                        continue
                    raise ImportNotGranted(
                        f"the module imports `torpor.tool_call` but policy `{policy_name}` grants no tools; "
                        "add a [tools.\"NAME\"] table to policy.toml"
                    )
                raise ImportNotGranted(f"the module imports `torpor.{name}`, which is not part of guest ABI v{abi.ABI_VERSION}")
            if mod == WASI_MODULE and name in wasi_allow:
                continue
            hint = " (add it to [wasi] allow in policy.toml)" if mod == WASI_MODULE else ""
            raise ImportNotGranted(
                f"the module imports `{mod}.{name}` ({kind}), which policy `{policy_name}` does not grant{hint}"
            )


class OperatorMemoryCap(MemoryLimitError):
    """The module fits its policy's memory budget but not the operator's cap on this host:
    the agent is sound (another host, or a larger cap, runs it), so it is refused, not
    parked as damaged."""


def memory_limit(policy: Policy, max_memory: int | None = None) -> int:
    """The agent's memory limit in bytes, whole wasm pages (what the store limits it to):
    its policy's budget, or the operator's cap ``max_memory`` when that is smaller."""
    memory = int(policy.budgets.memory or DEFAULT_MEMORY)
    if max_memory is not None:
        memory = min(memory, max_memory)
    return max(WASM_PAGE, memory - memory % WASM_PAGE)


def max_memory(value: int | str | None = None) -> int | None:
    """The operator's memory cap in bytes: ``value`` (bytes, or a size such as ``"256MiB"``),
    else ``$TORPOR_MAX_MEMORY``, else None (no cap beyond each bundle's own budget).

    Why an operator cap: ``budgets.memory`` is the bundle's word, and a bundle is not
    trusted; the operator bounds what any agent may hold on this host, whatever it declares.
    """
    where = "--max-memory"
    if value is None:
        value = os.environ.get(MAX_MEMORY_ENV, "").strip() or None
        where = f"${MAX_MEMORY_ENV}"
        if value is None:
            return None
    from policies.units import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if size < WASM_PAGE:
        raise ConfigError(f"{where}: a memory cap of {size} bytes is below one wasm page (64 KiB)")
    return size


def check_policy(shape: ModuleShape, policy: Policy, *, max_memory: int | None = None) -> None:
    """The checks that depend on the policy a module runs under and the host's memory cap:
    memory, then imports."""
    name = policy.agent.name
    budget = memory_limit(policy)
    limit = memory_limit(policy, max_memory)
    shape.check_memory(limit, policy_name=name, budget=budget if limit < budget else None)
    shape.check_imports(bool(policy.grants), frozenset(policy.wasi_allow), name)


def check_module(wasm: bytes, limits: HostLimits = HOST_LIMITS) -> ModuleShape:
    """Read every section of ``wasm`` and check it against the ABI and ``limits``.

    Raises :class:`ModuleError` (``invalid_module``) naming the rule; reads only the
    bytes given and allocates in proportion to the counts it has already bounded.
    """
    if len(wasm) > limits.max_module_bytes:
        raise ModuleError(f"the module is {_mib(len(wasm))}; this host accepts modules up to "
                          f"{_mib(limits.max_module_bytes)}")
    wasm_binary.check_header(wasm)
    p = _Parser(wasm, limits)
    p.run()
    shape = p.shape()
    _check_abi(shape)
    chunk = shape.custom.get(abi.CHUNK_SECTION)
    if chunk is not None and chunk not in {str(n).encode() for n in abi.CHUNK_SIZES}:
        raise ModuleError(f"the custom section {abi.CHUNK_SECTION} holds {chunk[:16]!r}; it names a checkpoint "
                          f"chunk size, one of {', '.join(map(str, abi.CHUNK_SIZES))}")
    return shape


class _Parser:
    """One pass over the sections, in order, each bounded by its declared size."""

    def __init__(self, wasm: bytes, limits: HostLimits) -> None:
        self.wasm = wasm
        self.limits = limits
        self.types: list[FuncSig] = []
        self.imports: list[Import] = []
        self.func_sigs: list[FuncSig] = []
        self.defined_funcs = 0
        self.tables: list[tuple[int, int | None]] = []
        self.memories: list[tuple[int, int | None]] = []
        self.globals: list[Global] = []
        self.exports: dict[str, Export] = {}
        self.code_bodies: int | None = None
        self.code_bytes = 0
        self.data_segments = 0
        self.custom: dict[str, bytes] = {}

    def run(self) -> None:
        r = Reader(self.wasm, 8)
        last = 0
        while r.left:
            sid = r.byte()
            size = r.u32()
            if size > r.left:
                raise r.fail(f"section {sid} declares {size} bytes; only {r.left} are left")
            body = Reader(self.wasm, r.pos, r.pos + size)
            r.skip(size)
            if sid == 0:
                name = body.name()
                self.custom[name] = self.wasm[body.pos : body.end]
                continue
            rank = _ORDER.get(sid)
            if rank is None:
                raise ModuleError(f"malformed wasm module: unknown section id {sid}")
            if rank <= last:
                raise ModuleError(f"malformed wasm module: the {_SECTION_NAMES[sid]} section is repeated or out of order")
            last = rank
            getattr(self, f"_section_{sid}")(body)
            if body.left:
                raise body.fail(f"the {_SECTION_NAMES[sid]} section has {body.left} bytes past its contents")
        if self.defined_funcs and self.code_bodies is None:
            raise ModuleError("malformed wasm module: functions are declared but there is no code section")

    # -- sections, by id ------------------------------------------------------------
    def _section_1(self, r: Reader) -> None:  # types
        lim = self.limits
        for _ in range(r.count("function types", lim.max_types, 3)):
            form = r.byte()
            if form != 0x60:
                raise ModuleError(f"the module declares a type of form 0x{form:02x}; agent modules may only "
                                  "declare function types (no GC types)")
            params = tuple(self._valtype(r) for _ in range(r.count("parameters in a function type", lim.max_params)))
            results = tuple(self._valtype(r) for _ in range(r.count("results in a function type", lim.max_params)))
            self.types.append(FuncSig(params, results))

    def _section_2(self, r: Reader) -> None:  # imports
        for _ in range(r.count("imports", self.limits.max_imports, 4)):
            module = r.name()
            name = r.name()
            kind = r.byte()
            if kind != 0:
                what = _KINDS[kind] if kind < len(_KINDS) else f"kind 0x{kind:02x}"
                raise ModuleError(f"the module imports a {what} (`{module}.{name}`); agent modules import only "
                                  "functions and define their own memory, tables and globals")
            sig = self._type(r)
            self.imports.append(Import(module, name, "func", sig))
            self._add_funcs(1)
            self.func_sigs.append(sig)

    def _section_3(self, r: Reader) -> None:  # functions
        n = r.count("functions", self.limits.max_functions)
        self._add_funcs(n)
        self.defined_funcs = n
        for _ in range(n):
            self.func_sigs.append(self._type(r))

    def _section_4(self, r: Reader) -> None:  # tables
        lim = self.limits
        for i in range(r.count("tables", lim.max_tables, 3)):
            reftype = r.byte()
            if reftype not in (0x70, 0x6F):
                raise ModuleError(f"table {i} has element type 0x{reftype:02x}; agent tables hold funcref or externref")
            initial, maximum = self._limits(r, f"table {i}")
            for what, n in (("initial", initial), ("maximum", maximum)):
                if n is not None and n > lim.max_table_elements:
                    raise ModuleError(f"table {i} declares {n} elements ({what} size); this host accepts tables "
                                      f"of at most {lim.max_table_elements} elements")
            self.tables.append((initial, maximum))

    def _section_5(self, r: Reader) -> None:  # memories
        n = r.count("memories", 1 << 16, 2)
        if n != 1:
            raise ModuleError(f"the module defines {n} memories; an agent module defines exactly one "
                              "(exported as `memory`)")
        initial, maximum = self._limits(r, "the memory")
        cap = self.limits.max_memory_pages
        if initial > cap or (maximum is not None and maximum > cap):
            raise MemoryLimitError(f"the module declares a memory of {max(initial, maximum or 0)} pages; "
                                   f"a memory has at most {cap} pages ({_mib(cap * WASM_PAGE)})")
        self.memories.append((initial, maximum))

    def _section_13(self, r: Reader) -> None:  # tags
        raise ModuleError("the module declares exception tags; agent modules may not use wasm exceptions")

    def _section_6(self, r: Reader) -> None:  # globals
        for i in range(r.count("globals", self.limits.max_globals, 3)):
            valtype = self._valtype(r)
            mut = r.byte()
            if mut not in (0, 1):
                raise r.fail(f"global {i} has mutability flag {mut}")
            self._const_expr(r)
            self.globals.append(Global(valtype, bool(mut)))

    def _section_7(self, r: Reader) -> None:  # exports
        sizes = {"func": len(self.func_sigs), "table": len(self.tables), "memory": len(self.memories),
                 "global": len(self.globals), "tag": 0}
        for _ in range(r.count("exports", self.limits.max_exports, 3)):
            name = r.name()
            kind_b = r.byte()
            if kind_b >= len(_KINDS):
                raise r.fail(f"export `{name}` has unknown kind 0x{kind_b:02x}")
            kind = _KINDS[kind_b]
            index = r.u32()
            if index >= sizes[kind]:
                raise ModuleError(f"malformed wasm module: export `{name}` names {kind} {index}, which does not exist")
            if name in self.exports:
                raise ModuleError(f"malformed wasm module: two exports are named `{name}`")
            self.exports[name] = Export(name, kind, index)

    def _section_8(self, r: Reader) -> None:  # start
        raise ModuleError(
            "the module traps while instantiating (start function?): agent modules may not "
            "have a start function; the entry point is the `torpor_main` export"
        )

    def _section_9(self, r: Reader) -> None:  # elements: counted; their entries are bytes of the section
        r.count("element segments", self.limits.max_element_segments)
        r.skip(r.left)

    def _section_12(self, r: Reader) -> None:  # data count
        r.u32()

    def _section_10(self, r: Reader) -> None:  # code
        lim = self.limits
        n = r.count("function bodies", lim.max_functions)
        if n != self.defined_funcs:
            raise ModuleError(f"malformed wasm module: {n} function bodies for {self.defined_funcs} declared functions")
        for i in range(n):
            size = r.u32()
            if size > lim.max_function_body:
                raise ModuleError(f"function {len(self.imports) + i} has {size} bytes of code; this host "
                                  f"accepts functions of at most {_mib(lim.max_function_body)}")
            r.skip(size)
            self.code_bytes += size
        if self.code_bytes > lim.max_code_bytes:
            raise ModuleError(f"the module has {_mib(self.code_bytes)} of code; this host accepts at most "
                              f"{_mib(lim.max_code_bytes)}")
        self.code_bodies = n

    def _section_11(self, r: Reader) -> None:  # data
        n = r.count("data segments", self.limits.max_data_segments)
        memory = self.memories[0][0] * WASM_PAGE if self.memories else 0
        for i in range(n):
            flag = r.u32()
            offset: int | None = None
            if flag in (0, 2):
                if flag == 2 and r.u32() != 0:
                    raise ModuleError(f"data segment {i} targets a memory other than the module's one memory")
                if not self.memories:
                    raise ModuleError(f"the module defines no memory but data segment {i} initialises one; an "
                                      "agent module defines exactly one (exported as `memory`)")
                offset = self._const_expr(r)
            elif flag != 1:
                raise r.fail(f"data segment {i} has unknown flag {flag}")
            size = r.u32()
            r.skip(size)
            if offset is not None and (offset & 0xFFFFFFFF) + size > memory:
                raise ModuleError(f"data segment {i} ({size} bytes at {offset & 0xFFFFFFFF}) lies outside the "
                                  f"module's initial memory of {memory} bytes")
        self.data_segments = n

    # -- pieces -------------------------------------------------------------------------
    def _add_funcs(self, n: int) -> None:
        if len(self.func_sigs) + n > self.limits.max_functions:
            raise ModuleError(f"the module declares {len(self.func_sigs) + n} functions; this host accepts at "
                              f"most {self.limits.max_functions}")

    def _type(self, r: Reader) -> FuncSig:
        idx = r.u32()
        if idx >= len(self.types):
            raise r.fail(f"type index {idx} does not exist")
        return self.types[idx]

    @staticmethod
    def _valtype(r: Reader) -> str:
        b = r.byte()
        name = _VALTYPES.get(b)
        if name is None:
            raise ModuleError(f"the module uses value type 0x{b:02x}; agent modules use numbers, v128 and "
                              "funcref/externref only (no typed references or GC)")
        return name

    @staticmethod
    def _limits(r: Reader, what: str) -> tuple[int, int | None]:
        flag = r.byte()
        if flag not in (0, 1):
            raise ModuleError(f"{what} has limits flag 0x{flag:02x}; agent modules use plain 32-bit, unshared "
                              "memories and tables")
        initial = r.u32()
        maximum = r.u32() if flag == 1 else None
        if maximum is not None and maximum < initial:
            raise ModuleError(f"malformed wasm module: {what} has a maximum below its initial size")
        return initial, maximum

    @staticmethod
    def _const_expr(r: Reader) -> int | None:
        """Skip a constant expression; its value if it is a lone ``i32.const``."""
        value: int | None = None
        ops = 0
        while True:
            op = r.byte()
            ops += 1
            if op == 0x0B:
                return value if ops == 2 else None
            if op == 0x41:
                value = r.sleb(32)
            elif op == 0x42:
                r.sleb(64)
            elif op == 0x43:
                r.skip(4)
            elif op == 0x44:
                r.skip(8)
            elif op in (0x23, 0xD2):  # global.get, ref.func
                r.u32()
            elif op == 0xD0:  # ref.null
                r.byte()
            elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended constant arithmetic
                pass
            elif op == 0xFD and r.u32() == 12:  # v128.const
                r.skip(16)
            else:
                raise r.fail(f"unsupported instruction 0x{op:02x} in a constant expression")

    def shape(self) -> ModuleShape:
        if len(self.memories) != 1:
            raise ModuleError("the module defines no memory; an agent module defines exactly one (exported as `memory`)")
        for i, g in enumerate(self.globals):
            if g.valtype not in NUMERIC:
                names = [f"`{e.name}`" for e in self.exports.values() if e.kind == "global" and e.index == i]
                what = f"global {i} (exported as {', '.join(names)})" if names else f"global {i}"
                raise ModuleError(f"{what} has type {g.valtype}; the host snapshots globals of type "
                                  f"{', '.join(NUMERIC)} only")
        return ModuleShape(
            size=len(self.wasm), imports=tuple(self.imports), exports=self.exports, func_sigs=tuple(self.func_sigs),
            globals=tuple(self.globals), tables=tuple(self.tables), memory_pages=self.memories[0],
            code_bytes=self.code_bytes, data_segments=self.data_segments, custom=self.custom,
        )


def _i32_sig(nparams: int, nresults: int) -> FuncSig:
    return FuncSig(("i32",) * nparams, ("i32",) * nresults)


def _check_abi(shape: ModuleShape) -> None:
    """The exports and imports the host calls, reads or links: each of the kind and type it uses."""
    ex = shape.exports
    entry = ex.get(abi.ENTRY_EXPORT)
    if entry is None or entry.kind != "func":
        raise ModuleError(
            f"the module has no `{abi.ENTRY_EXPORT}` function export: an agent's entry point is "
            f"`int {abi.ENTRY_EXPORT}(void)` (see guest_sdk/ABI.md)"
        )
    sig = shape.func_sigs[entry.index]
    if sig.params or sig.results not in ((), ("i32",)):
        raise ModuleError(f"`{abi.ENTRY_EXPORT}` must take no parameters and return at most one i32; it is {sig}")
    mem = ex.get(abi.MEMORY_EXPORT)
    if mem is None or mem.kind != "memory":
        raise ModuleError("the module does not export its linear memory as `memory`")

    present = [n for n in abi.ASYNCIFY_EXPORTS if n in ex]
    if present and len(present) != len(abi.ASYNCIFY_EXPORTS):
        missing = ", ".join(f"`{n}`" for n in abi.ASYNCIFY_EXPORTS if n not in ex)
        raise ModuleError(f"the module exports part of Asyncify's controls but not {missing}; "
                          "repack it with `torpor pack`")
    for name, (nparams, nresults) in {**abi.ASYNCIFY_SIGNATURES, abi.INITIALIZE_EXPORT: (0, 0)}.items():
        e = ex.get(name)
        if e is None:
            continue
        want_sig = _i32_sig(nparams, nresults)
        if e.kind != "func":
            raise ModuleError(f"the export `{name}` is a {e.kind}; the host calls it as a function {want_sig}")
        got = shape.func_sigs[e.index]
        if got != want_sig:
            raise ModuleError(f"the export `{name}` has type {got}; the host calls it as {want_sig}")
    for name in (abi.ASYNC_BUF_EXPORT, abi.STACK_POINTER_EXPORT, abi.SEED_EXPORT):
        e = ex.get(name)
        if e is not None and (e.kind != "global" or shape.globals[e.index].valtype != "i32"):
            what = e.kind if e.kind != "global" else f"global of type {shape.globals[e.index].valtype}"
            raise ModuleError(f"the export `{name}` is a {what}; the host reads it as an i32 global")
    for name, e in ex.items():
        if name.startswith(abi.GLOBAL_EXPORT_PREFIX) and e.kind != "global":
            raise ModuleError(f"the export `{name}` is a {e.kind}; names starting with "
                              f"`{abi.GLOBAL_EXPORT_PREFIX}` are the globals the host snapshots")

    for imp in shape.imports:
        assert imp.sig is not None
        odd = [t for t in (*imp.sig.params, *imp.sig.results) if t not in NUMERIC]
        if odd:
            raise ModuleError(f"the import `{imp.module}.{imp.name}` has type {imp.sig}; host functions take "
                              f"and return {', '.join(NUMERIC)} only")
        if imp.module == abi.IMPORT_MODULE and imp.name in abi.IMPORT_SIGNATURES:
            want_sig = _i32_sig(*abi.IMPORT_SIGNATURES[imp.name])
            if imp.sig != want_sig:
                raise ModuleError(f"the import `torpor.{imp.name}` has type {imp.sig}; guest ABI "
                                  f"v{abi.ABI_VERSION} defines it as {want_sig}")


def _mib(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n} bytes"
