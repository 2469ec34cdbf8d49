"""The project's whole hostile-input suite, once more, through the real CLI.

Every hostile input the other tests make (malformed and ill-typed modules, archives with
``../`` members, duplicates, symlinks and bombs, huge declared memories, modules that
kill Binaryen, poison JSON given as input or sent by a guest, wild pointers, damaged and
truncated stores, policies with typos, the fuzzing's findings) is built with those tests'
own builders and run as a ``python -m host.cli ... --json`` subprocess against real temp
stores. Each command must end by itself (never a signal), print no ``internal error``
and no traceback, and answer in a typed way: a JSON error with a ``code`` (and, for a
sample, one ``error[code]:`` line without ``--json``) or the document its command
prints, with the damage reported in it. Afterwards the shared store resumes cleanly and
runs ``hello``. The commands run in a thread pool: one test, well within a minute of CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import test_budget_boundary as bb
import test_module_validation as mv
import test_toolchain_isolation as ti
from conftest import EXAMPLES, ROOT, BundleFactory
from test_agent_boundary import _flip, _raw, _store_with_forks
from test_poison_values import POISON

Check = Callable[[Any], object]


@dataclass
class Case:
    """One hostile command: refused with ``code`` ("*": any), or answered with a document ``check`` accepts."""

    name: str
    argv: list[str]
    code: str | None = None
    check: Check | None = None
    human: bool = False  # also without --json: one `torpor: error[code]: ...` line
    env: dict[str, str] = field(default_factory=dict)


def torpor(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *argv], capture_output=True, text=True, timeout=180,
                          cwd=ROOT, env={**os.environ, **env})


ERROR_LINE = re.compile(r"^torpor: error\[[a-z_]+\]: \S", re.MULTILINE)


def verdict(case: Case) -> str | None:
    """What is wrong with how the CLI answered ``case`` (None: nothing)."""
    proc = torpor([*case.argv, "--json"], case.env)
    said = proc.stdout + proc.stderr
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}: {said[-800:]}"
    if "internal error" in said or "Traceback" in said:
        return f"internal error: {said[-1500:]}"
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return f"no JSON document on stdout (exit {proc.returncode}): {said[-800:]}"
    if case.code is not None:
        error = out.get("error") if isinstance(out, dict) else None
        if proc.returncode == 0 or not isinstance(error, dict) or not isinstance(error.get("code"), str):
            return f"not a typed refusal (exit {proc.returncode}): {said[-800:]}"
        if case.code != "*" and error["code"] != case.code:
            return f"refused as {error['code']}, expected {case.code}: {error.get('message')}"
    elif case.check is not None:
        try:
            case.check(out)
        except (AssertionError, LookupError, TypeError) as exc:
            return f"unexpected answer ({type(exc).__name__}: {exc}): {proc.stdout[-800:]}"
    if case.human:
        plain = torpor(case.argv, case.env)
        if plain.returncode <= 0 or not ERROR_LINE.search(plain.stderr) or "Traceback" in plain.stderr:
            return f"without --json: exit {plain.returncode}, stderr {plain.stderr[-800:]!r}"
    return None


# -- what each answer must say ------------------------------------------------------------------


def completed_with(output: Any) -> Check:
    def check(out: Any) -> None:
        assert out["status"] == "completed", out.get("error")
        assert out["output"] == output, out["output"]
    return check


def completed(out: Any) -> None:
    assert out["status"] == "completed", out.get("error")


def failed_with(code: str) -> Check:
    def check(out: Any) -> None:
        assert out["status"] == "failed" and out["error"]["code"] == code, out.get("error")
    return check


def wild_completed(out: Any) -> None:
    assert out["status"] == "completed" and out["output"]["mismatches"] == [], out


def lists_all(*ids: str) -> Check:
    """A listing that goes on past damaged records: every agent in it (a damaged one may be
    listed from its summary until ``resume --all`` finds the damage)."""
    def check(out: Any) -> None:
        assert {r["agent_id"] for r in out} >= set(ids), out
    return check


def report_not_ok(out: Any) -> None:
    assert out["ok"] is False and out["problems"], out


# -- the suite ----------------------------------------------------------------------------------


def module_cases(tmp: Path, store: Path) -> list[Case]:
    """Modules of the wrong kind, type or shape, huge memories, and what kills Binaryen."""
    cases = []
    hostile = {**{k: (mv.bundle_of(m), "invalid_module") for k, (m, _) in mv.WRONG_KIND.items()},
               **{k: (mv.bundle_of(m), c) for k, (m, c, _) in mv.SHAPES.items()},
               "huge declared memory": (mv.bundle_of(mv.agent_wat(memory='(memory (export "memory") 60000)')),
                                        "memory_limit"),
               "truncated module": (mv.bundle_of(mv.agent_wat()[:40]), "*"),
               "not a bundle": (b"hello, I am not a bundle", "invalid_bundle")}
    for i, (name, (raw, code)) in enumerate(sorted(hostile.items())):
        path = tmp / f"module{i}.torpor"
        path.write_bytes(raw)
        cases.append(Case(f"module: {name}", ["run", str(path), "--store", str(store)], code, human=i == 0))
        # Pushed to the registry: refused the same way, before anything is stored.
        cases.append(Case(f"push module: {name}", ["push", str(path), "--name", "hostile", "--store", str(store)],
                          code, human=i == 0))
    for name, (make, env, code, _) in sorted(ti.CLI_CASES.items()):
        if env:
            continue  # the limit cases take seconds of Binaryen by design; test_toolchain_isolation runs them
        path = tmp / f"{name}.wasm"
        path.write_bytes(make())
        cases.append(Case(f"pack: {name}", ["pack", str(path), "--policy", str(ti.HELLO_POLICY),
                                            "-o", str(tmp / f"{name}.torpor")], code, human=name == "tail_call"))
    return cases


def archive_cases(tmp: Path, store: Path) -> list[Case]:
    """Bundles with bombs, escaping names, links, duplicates and lying manifests."""
    import zlib

    E, ms = mv.Entry, mv.members()
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    bomb = c.compress(mv.GOOD_MODULE) + b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
    sized = json.loads(mv.manifest_for(ms))
    sized["files"]["policy.toml"]["size"] += 5
    archives: dict[str, list[mv.Entry]] = {
        "zip bomb": [*mv.honest(ms)[:1], E("agent.wasm", mv.GOOD_MODULE, stream=bomb), *mv.honest(ms)[2:]],
        "symlink member": [*mv.honest({**ms, "tools/link.py": b"/etc/passwd"})[:3],
                           E("tools/link.py", b"/etc/passwd", mode=0o120777)],
        "directory member": [*mv.honest(ms), E("tools/", b"", mode=0o040755)],
        "duplicate policy": [*mv.honest(ms), E("policy.toml", mv.POLICY.replace("16MiB", "4GiB").encode())],
        "duplicate manifest": [*mv.honest(ms), E("manifest.json", mv.manifest_for(ms, name="other"))],
        "manifest size mismatch": [E("manifest.json", json.dumps(sized).encode()), *mv.honest(ms)[1:]],
        "member not in the manifest": [*mv.honest(ms), E("tools/extra.py", b"x = 1\n")],
        "manifest names another agent": mv.honest(ms, name="root-agent"),
        "../ in the manifest": [E("manifest.json", mv.manifest_for({**ms, "../escape.py": b"x"})),
                                *mv.honest(ms)[1:]],
        **{f"member {bad!r}": [*mv.honest(ms), E(bad, b"print('pwned')\n")]
           for bad in ["../x.py", "/abs/x.py", "tools/../../x.py", "C:/x.py", "tools\\..\\x.py"]},
    }
    cases = []
    for i, (name, entries) in enumerate(archives.items()):
        path = tmp / f"archive{i}.torpor"
        path.write_bytes(mv.zip_bytes(entries))
        cases.append(Case(f"bundle: {name}", ["run", str(path), "--store", str(store)], "invalid_bundle",
                          human=i == 0))
        cases.append(Case(f"push bundle: {name}", ["push", str(path), "--store", str(store)], "invalid_bundle"))
        if i < 3:
            cases.append(Case(f"inspect-bundle: {name}", ["inspect-bundle", str(path)], "invalid_bundle"))
    bad = tmp / "flipped.torpor"
    raw = bytearray(mv.zip_bytes(mv.honest(ms)))
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    cases.append(Case("bundle: a flipped byte", ["run", str(bad), "--store", str(store)], "invalid_bundle"))
    return cases


def poison_cases(tmp: Path, store: Path, bundles: BundleFactory) -> list[Case]:
    """Poison JSON as an input, and sent by a guest as tool arguments and as its output."""
    hello, poison = bundles.example("hello"), bundles.guest("poison")
    inputs = {"depth 100k": "[" * 100_000 + "]" * 100_000, "lone surrogate": '{"name": "\\ud800"}',
              "1e400": '{"name": 1e400}', "2**70": '{"name": ' + str(2**70) + "}", "NaN": '{"name": NaN}'}
    cases = []
    for i, (name, text) in enumerate(inputs.items()):
        given = tmp / f"input{i}.json"
        given.write_text(text)
        cases.append(Case(f"input: {name}", ["run", str(hello), "--input", f"@{given}", "--store", str(store)],
                          "invalid_config", human=i == 0))
    refused = completed_with({"rc": -2, "code": "invalid_json"})
    for i, (name, text) in enumerate(sorted(POISON.items())):
        for mode in ("call", "output"):
            given = tmp / f"poison{i}{mode}.json"
            given.write_text(json.dumps({"mode": mode, "text": text}))
            cases.append(Case(f"guest sends {name} ({mode})",
                              ["run", str(poison), "--input", f"@{given}", "--store", str(store)], check=refused))
    return cases


def guest_cases(store: Path, bundles: BundleFactory) -> list[Case]:
    """Wild pointers and lengths on every import; what the fuzzing found, replayed."""
    wild, fuzzops = bundles.guest("wild"), bundles.path(ROOT / "bench" / "guests" / "fuzzops")

    def ops(*op: list[Any]) -> str:
        return json.dumps({"mode": "ops", "scratch": 4096, "ops": list(op)})

    def first_rc(rc: int) -> Check:
        def check(out: Any) -> None:
            assert out["status"] == "completed" and out["output"]["results"][0][0] == rc, out
        return check

    name_then_args = (b"x" * 129 + b"{}").hex()
    return [
        Case("wild pointers", ["run", str(wild), "--store", str(store), "--input", "{}"], check=wild_completed),
        Case("wild abort message", ["run", str(wild), "--store", str(store), "--input", '{"abort": true}'],
             check=failed_with("aborted")),
        Case("abort of kind 2", ["run", str(fuzzops), "--store", str(store), "--input",
                                 ops([7, 0, 0, 4, 0, 0, 0, 2, b"boom".hex()])], check=failed_with("aborted")),
        Case("tool_call: long name, args out of bounds",
             ["run", str(fuzzops), "--store", str(store), "--input", ops([4, 0, 0, 129, 1, 0, 12, 0, name_then_args])],
             check=first_rc(-1)),
        Case("tool_call: vertical tab arguments", ["run", str(fuzzops), "--store", str(store), "--input",
                                                   ops([4, 0, 0, 6, 0, 6, 1, 0, (b"kv.get\x0b").hex()])],
             check=first_rc(-2)),
    ]


def budget_cases(tmp: Path, store: Path) -> list[Case]:
    """Guests that try to step around a budget: a table grown to millions of slots, an iovec
    vector that multiplies one page, an Asyncify control that spins when the host calls it."""
    def run(wat: str, policy: str, name: str) -> list[str]:
        return ["run", str(bb.bundle_of(tmp, wat, policy, name)), "--store", str(store)]

    return [
        Case("budget: table grown past the limit", run(bb.TABLE_GROWER, bb.POLICY.format(name="tables", wall="10s"),
                                                       "tables"), check=completed_with({"grew": -1})),
        Case("budget: iovecs over one page", run(bb.IOVEC_AMPLIFIER, bb.POLICY.format(name="iovecs", wall="20s")
                                                 + '[wasi]\nallow = ["fd_write"]\n', "iovecs"),
             check=completed),
        Case("budget: a control export that spins",
             [*run(bb.CONTROLS_THAT_NEVER_RETURN, bb.POLICY.format(name="spinner", wall="2s") + '[tools."clock.now"]\n',
                   "spinner"), "--fuel", str(10**15)], check=failed_with("deadline_exceeded")),
    ]


def policy_cases(tmp: Path) -> list[Case]:
    """Policy files with typos, bad values, bad TOML, bad bytes; packed and checked."""
    texts = {
        "budgets typo": '[agent]\nname = "x"\n[budgets]\nfuell = 100\n',
        "top-level typo": '[agnet]\nname = "x"\n',
        "tool typo": '[agent]\nname = "x"\n[tools."kv.gett"]\n',
        "bad unit": '[agent]\nname = "x"\n[budgets]\nmemory = "16 MiBs"\n',
        "negative fuel": '[agent]\nname = "x"\n[budgets]\nfuel = -1\n',
        "not TOML": '[agent\nname = "x"\n',
        "deep arrays": '[agent]\nname = "x"\nx = ' + "[" * 5000 + "]" * 5000 + "\n",
    }
    cases = []
    for i, (name, text) in enumerate(texts.items()):
        path = tmp / f"policy{i}.toml"
        path.write_text(text)
        cases.append(Case(f"policy check: {name}", ["policy", "check", str(path)], "invalid_policy", human=i == 0))
    latin1 = tmp / "latin1.toml"
    latin1.write_bytes('[agent]\nname = "café"\n'.encode("latin-1"))
    cases.append(Case("policy check: not UTF-8", ["policy", "check", str(latin1)], "invalid_policy"))
    module = tmp / "good.wasm"
    module.write_bytes(mv.GOOD_MODULE)
    cases.append(Case("pack under a typo", ["pack", str(module), "--policy", str(tmp / "policy0.toml"),
                                            "-o", str(tmp / "typo.torpor")], "invalid_policy"))
    agent = tmp / "typo-agent"
    agent.mkdir()
    (agent / "agent.c").write_text((EXAMPLES / "hello" / "agent.c").read_text())
    (agent / "policy.toml").write_text(texts["tool typo"])
    cases.append(Case("build under a typo", ["build", str(agent), "-o", str(tmp / "typo-agent.torpor")],
                      "invalid_policy"))
    return cases


def store_cases(tmp: Path, bundles: BundleFactory) -> list[Case]:
    """A store with damaged records (a flipped checkpoint, records that are not JSON, a
    damaged audit record), and a store whose data file was cut short. Each command gets a
    copy of its own, so that none sees another's repairs."""
    damaged = tmp / "damaged"
    _, forks = _store_with_forks(bundles, damaged, 4)
    _flip(damaged / "db", forks[0], 1)
    _raw(damaged / "db", b"agents", forks[1].encode(), b"{not json")
    _raw(damaged / "db", b"agents", forks[2].encode(), b"\xff\xfe")
    _raw(damaged / "db", b"audit", f"{forks[3]}/000000000002".encode(), b"\xff\xfe")
    truncated = tmp / "truncated"
    _store_with_forks(bundles, truncated, 1)
    data = truncated / "db" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2 // 4096 * 4096)

    def copy(src: Path, name: str) -> str:
        dst = tmp / name
        shutil.copytree(src, dst)
        return str(dst)

    def resumed(out: Any) -> None:
        by_id = {r["agent_id"]: r for r in out}
        assert by_id[forks[0]]["status"] == "corrupt" and by_id[forks[0]]["error"]["code"] == "snapshot_corrupt"
        assert by_id[forks[3]]["status"] == "completed", by_id[forks[3]]

    cases = [
        Case("damaged store: ps", ["ps", "--store", copy(damaged, "d-ps")], check=lists_all(*forks)),
        Case("damaged store: resume --all", ["resume", "--all", "--store", copy(damaged, "d-resume")], check=resumed),
        Case("damaged store: audit verify", ["audit", "verify", "--store", copy(damaged, "d-audit")],
             check=report_not_ok),
        Case("damaged store: store check", ["store", "check", "--store", copy(damaged, "d-check")],
             check=report_not_ok),
        Case("damaged store: inspect a corrupt record", ["inspect", forks[1], "--store", copy(damaged, "d-inspect")],
             check=lambda out: out),
        Case("damaged store: inspect a flipped checkpoint", ["inspect", forks[0], "--store", copy(damaged, "d-insp0")],
             check=lambda out: out),
    ]
    for i, argv in enumerate((["ps"], ["resume", "--all"], ["audit", "verify"], ["inspect", forks[0]])):
        cases.append(Case(f"truncated data.mdb: {' '.join(argv)}", [*argv, "--store", copy(truncated, f"t{i}")],
                          "store_corrupt", human=i == 0))
    cases.append(Case("truncated data.mdb: store check", ["store", "check", "--store", copy(truncated, "t-check")],
                      check=report_not_ok))
    return cases


def test_every_hostile_input_gets_a_typed_answer_from_the_cli(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = torpor(["run", str(bundles.example("hello")), "--store", str(store), "--input", '{"name":"ada"}',
                    "--json"], {})
    assert first.returncode == 0, first.stderr
    for name in ("wild", "poison"):
        bundles.guest(name)
    cases = [*module_cases(tmp_path, store), *archive_cases(tmp_path, store),
             *poison_cases(tmp_path, store, bundles), *guest_cases(store, bundles), *budget_cases(tmp_path, store),
             *policy_cases(tmp_path),
             *store_cases(tmp_path, bundles)]
    assert len({c.name for c in cases}) == len(cases)
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(verdict, cases))
    wrong = {c.name: v for c, v in zip(cases, verdicts, strict=True) if v is not None}
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    # The shared store went through every refusal and poison above: nothing is left running,
    # and the same store still runs hello.
    listed = torpor(["registry", "list", "--store", str(store), "--json"], {})  # no hostile push was stored
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"bundles": []}, listed.stdout + listed.stderr
    after = torpor(["resume", "--all", "--store", str(store), "--json"], {})
    assert after.returncode == 0 and json.loads(after.stdout) == [], after.stdout + after.stderr
    hello = torpor(["run", str(bundles.example("hello")), "--store", str(store), "--input", '{"name":"bo"}',
                    "--json"], {})
    assert json.loads(hello.stdout)["output"] == {"greeting": "hello, bo"}, hello.stdout + hello.stderr
