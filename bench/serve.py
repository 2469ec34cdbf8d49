"""``torpor bench serve``: a real ``torpor serve`` on 127.0.0.1 under load, against the embedded host.

Why a separate server process and a client of our own: what a deployment pays is a
request crossing a socket into uvicorn, the gateway, the route, the store and back, in a
process that owns its event loop; a server in the benchmark's own process would share
the client's GIL and hide or inflate exactly that. The load client is a minimal
keep-alive HTTP/1.1 client on asyncio streams (a request is a few writes and reads, tens
of microseconds), so that on a 2-core machine its own cost stays small beside the
server's; every answer's status is checked, and a wrong one fails the benchmark.

Measured in one run, each against a baseline taken in the same run:

* **start-to-completion of ``hello`` over HTTP** (``POST /v1/runs`` with ``wait``, one
  client, sequential), p50/p90/p99, beside the embedded ``Host.run`` of the same bundle
  on a store of the same durability in this process: the ratio and the latency HTTP adds.
  Both durabilities (``sync``: each commit ``fdatasync``ed; ``process``) are measured,
  each on its own server, since the commits' syncs are most of the embedded figure;
* **requests per second** of start-run (``POST /v1/runs`` of ``hello``, answered once the
  spawn is durable, the run driven in the background) and get-agent (``GET
  /v1/agents/{id}``) with 1 and 16 concurrent clients, beside ``GET /healthz`` (no
  token, no route work: the floor of uvicorn and Starlette on this machine);
* **agents hibernated on one server**: N runs of the ``park`` bench guest started over
  HTTP (each parks ``waiting_approval`` at its first tool call, its instance dropped, its
  state in the store), then the server's ``VmRSS``/``VmHWM`` from ``/proc/PID/status``
  against the same server idle before them; the store is then read back (every one
  parked) and one agent is approved over HTTP and completes;
* with ``--against DIR`` (another checkout, such as the commit before a change), hello over
  HTTP on this tree's server and on that one's side by side, request by request: on a
  machine whose load comes and goes, the one comparison of two versions it does not skew.

The server runs with rate limits raised out of the way (a benchmark measures the path,
not the limiter); every other guarantee (a token checked on every request, the spawn
committed before the answer) is the default one.

Also ``python bench/serve.py [--quick] [--json] ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/serve.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench.rig import BENCH_GUESTS, EXAMPLES, Latency, Progress, cdf, draw_plot, machine, positive
from host.errors import ConfigError, TorporError
from host.sandbox import bundle as bundle_mod
from host.sandbox.bundle import Bundle

#: The targets of issue 15 (2-core machine): hello start-to-completion over HTTP, and the
#: RSS of a server holding 10,000 hibernated agents.
HELLO_P50_TARGET_MS = 2.0
RSS_TARGET_MIB = 1024.0
TENANT = "bench"
#: Rate limits out of the way (per second and burst, per token and tenant).
NO_LIMIT = "1000000000"
DURABILITIES = ("sync", "process")


# -- the load client ----------------------------------------------------------------------
class HttpConn:
    """One keep-alive HTTP/1.1 connection: a request at a time, its status and body back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # a request is one small write: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host)

    async def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
        raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(raw)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        status = int(status_line.split()[1])
        if "content-length" in headers:
            return status, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")
            return status, b"".join(parts)
        raise TorporError(f"{method} {path}: an answer with neither Content-Length nor chunks")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def _expect(what: str, status: int, body: bytes, want: int) -> dict[str, Any]:
    if status != want:
        raise TorporError(f"{what}: HTTP {status} (expected {want}): {body[:300].decode(errors='replace')}")
    out: dict[str, Any] = json.loads(body)
    return out


Call = Callable[[HttpConn, int], Awaitable[None]]


async def _load(port: int, clients: int, n: int, call: Call) -> tuple[float, Latency]:
    """``n`` calls spread over ``clients`` connections, each sequential; (requests/s, latency)."""
    conns = [await HttpConn.open("127.0.0.1", port) for _ in range(clients)]
    lat = Latency()
    counter = iter(range(n))

    async def worker(conn: HttpConn) -> None:
        for i in counter:
            t0 = time.perf_counter_ns()
            await call(conn, i)
            lat.add(time.perf_counter_ns() - t0)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    return n / elapsed, lat


# -- the server -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``torpor serve`` as its own process on a free port of 127.0.0.1 (``python -m host.cli``)."""

    def __init__(self, store: Path, durability: str, log: Path, tree: Path | None = None) -> None:
        """``tree``: the checkout whose code the server runs (default this one's)."""
        self.port = _free_port()
        env = dict(os.environ)
        root = str(tree or Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "serve", "--store", str(store), "--listen", f"127.0.0.1:{self.port}",
             "--durability", durability, "--token-rate", NO_LIMIT, "--token-burst", NO_LIMIT,
             "--tenant-rate", NO_LIMIT, "--tenant-burst", NO_LIMIT],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=root)

    async def ready(self, limit_s: float = 120.0) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            if self.proc.poll() is not None:
                raise TorporError(f"torpor serve exited {self.proc.returncode}: {self._tail()}")
            try:
                conn = await HttpConn.open("127.0.0.1", self.port)
                try:
                    if (await conn.request("GET", "/readyz"))[0] == 200:
                        return
                finally:
                    await conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TorporError(f"torpor serve did not become ready in {limit_s:g} s: {self._tail()}")
            await asyncio.sleep(0.05)

    async def idle(self, limit_s: float = 300.0) -> None:
        """Wait until the server drives no agent (the background runs of a start-run load)."""
        conn = await HttpConn.open("127.0.0.1", self.port)
        try:
            deadline = time.monotonic() + limit_s
            while _expect("GET /readyz", *await conn.request("GET", "/readyz"), 200)["agents_running"]:
                if time.monotonic() > deadline:
                    raise TorporError(f"the server still drives agents after {limit_s:g} s")
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def cpu_s(self) -> float:
        """CPU time (user + system) the server process has used so far, in seconds.

        In clock ticks (10 ms on Linux): a figure per run needs hundreds of runs to mean
        anything, and a short smoke run may read 0."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kib(self) -> dict[str, int]:
        """``VmRSS``, ``VmHWM`` and ``RssAnon`` of the server process, in KiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
        return out

    def stop(self) -> int:
        """SIGTERM (the server drains), then its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)

    def _tail(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace").strip()[-1000:]


def _bundle(name: str) -> Bundle:
    for base in (EXAMPLES, BENCH_GUESTS):
        if (base / name / "policy.toml").exists():
            return bundle_mod.load_bytes(bundle_mod.build_dir(base / name), source=name)
    raise ConfigError(f"no example or bench guest named {name!r}")


def _prepare(store: Path, durability: str, bundles: list[Bundle]) -> str:
    """Push ``bundles`` to the tenant's registry in a new store; an operator token's secret."""
    from host.runtime import Host
    from host.trust import operator_tokens

    with Host(store, durability=durability) as host:
        for b in bundles:
            host.registry.push(b.raw, tenant=TENANT, by="torpor bench serve")
        secret, _ = operator_tokens.create(host.store, tenant=TENANT, name="bench",
                                           scopes=["runs:write", "runs:read", "approvals:write"])
    return secret


# -- the phases ---------------------------------------------------------------------------------
async def _embedded(store: Path, durability: str, b: Bundle, n: int, warmup: int) -> tuple[Latency, float]:
    """``Host.run`` of ``b`` in this process, sequential: the baseline of the HTTP latency;
    and the CPU time of this process per run (its threads', the group commit's too)."""
    from host.runtime import Host

    lat = Latency()
    cpu0 = 0.0
    with Host(store, durability=durability) as host:
        for i in range(warmup + n):
            if i == warmup:
                cpu0 = time.process_time()
            t0 = time.perf_counter_ns()
            r = await host.run(b, {"name": "ada"})
            if i >= warmup:
                lat.add(time.perf_counter_ns() - t0)
            if r.status != "completed" or r.output != {"greeting": "hello, ada"}:
                raise TorporError(f"embedded hello ended {r.status}: {r.error or r.output}")
        cpu = (time.process_time() - cpu0) / n
    return lat, cpu


async def _hello_over_http(srv: Server, token: str, n: int, warmup: int) -> tuple[Latency, float]:
    """``POST /v1/runs`` of hello with ``wait``, sequential; and the server's CPU time per run."""
    conn = await HttpConn.open("127.0.0.1", srv.port)
    lat = Latency()
    body = {"agent": "hello", "input": {"name": "ada"}, "wait": 30}
    cpu0 = 0.0
    try:
        for i in range(warmup + n):
            if i == warmup:
                cpu0 = srv.cpu_s()
            t0 = time.perf_counter_ns()
            status, raw = await conn.request("POST", "/v1/runs", body, token)
            if i >= warmup:
                lat.add(time.perf_counter_ns() - t0)
            rec = _expect("POST /v1/runs (wait)", status, raw, 201)
            if rec.get("status") != "completed" or rec.get("output") != {"greeting": "hello, ada"}:
                raise TorporError(f"hello over HTTP ended {rec.get('status')}: {rec.get('error') or rec.get('output')}")
        cpu = (srv.cpu_s() - cpu0) / n
    finally:
        await conn.close()
    return lat, cpu


async def _latency_phase(tmp: Path, durability: str, n: int, warmup: int, progress: bool) -> dict[str, Any]:
    """HTTP hello and embedded hello at one durability, on stores of their own."""
    hello = _bundle("hello")
    token = _prepare(tmp / f"http-{durability}", durability, [hello])
    srv = Server(tmp / f"http-{durability}", durability, tmp / f"serve-{durability}.log")
    try:
        await srv.ready()
        if progress:
            print(f"hello over HTTP, durability {durability}: {n} runs", file=sys.stderr)
        http, http_cpu = await _hello_over_http(srv, token, n, warmup)
    finally:
        srv.stop()
    if progress:
        print(f"embedded Host.run, durability {durability}: {n} runs", file=sys.stderr)
    embedded, embedded_cpu = await _embedded(tmp / f"embedded-{durability}", durability, hello, n, warmup)
    h, e = http.summary(), embedded.summary()
    # CPU time is what a loaded machine stretches least: the server's per run over HTTP
    # against this process's per embedded run.
    return {"durability": durability, "http": h, "embedded": e,
            "http_cpu_us": round(http_cpu * 1e6, 1), "embedded_cpu_us": round(embedded_cpu * 1e6, 1),
            "added_cpu_us": round((http_cpu - embedded_cpu) * 1e6, 1),
            "p50_ratio": round(h["p50_us"] / e["p50_us"], 2), "p99_ratio": round(h["p99_us"] / e["p99_us"], 2),
            "added_p50_us": round(h["p50_us"] - e["p50_us"], 1), "added_p90_us": round(h["p90_us"] - e["p90_us"], 1),
            "added_p99_us": round(h["p99_us"] - e["p99_us"], 1),
            "_samples": {f"hello over HTTP ({durability})": http.samples,
                         f"embedded Host.run ({durability})": embedded.samples}}


async def _paired_phase(tmp: Path, durability: str, n: int, warmup: int, against: Path,
                        progress: bool) -> dict[str, Any]:
    """Hello over HTTP on this tree's server and on ``against``'s, side by side, alternated
    request by request (who goes first alternates too): both see the same moments of a
    loaded machine, which sequential runs do not. Each on a store of its own."""
    hello = _bundle("hello")
    trees = {"this": None, "that": against}
    srvs: dict[str, Server] = {}
    conns: dict[str, HttpConn] = {}
    tokens = {name: _prepare(tmp / f"paired-{name}-{durability}", durability, [hello]) for name in trees}
    body = {"agent": "hello", "input": {"name": "ada"}, "wait": 30}
    lat: dict[str, list[int]] = {name: [] for name in trees}
    cpu0: dict[str, float] = {}
    try:
        for name, tree in trees.items():
            srvs[name] = Server(tmp / f"paired-{name}-{durability}", durability, tmp / f"serve-paired-{name}.log", tree)
        for name in trees:
            await srvs[name].ready()
            conns[name] = await HttpConn.open("127.0.0.1", srvs[name].port)
        if progress:
            print(f"hello over HTTP, this tree against {against}, durability {durability}: {n} runs each",
                  file=sys.stderr)
        for i in range(warmup + n):
            if i == warmup:
                cpu0 = {name: srvs[name].cpu_s() for name in trees}
            for name in (("this", "that") if i % 2 == 0 else ("that", "this")):
                t0 = time.perf_counter_ns()
                status, raw = await conns[name].request("POST", "/v1/runs", body, tokens[name])
                if i >= warmup:
                    lat[name].append(time.perf_counter_ns() - t0)
                rec = _expect(f"POST /v1/runs (wait, {name})", status, raw, 201)
                if rec.get("status") != "completed":
                    raise TorporError(f"hello over HTTP ({name}) ended {rec.get('status')}: {rec.get('error')}")
        cpu = {name: (srvs[name].cpu_s() - cpu0[name]) / n for name in trees}
    finally:
        for c in conns.values():
            await c.close()
        for srv in srvs.values():
            srv.stop()
    out: dict[str, Any] = {"durability": durability, "against": str(against)}
    for name in trees:
        summary = Latency()
        for v in lat[name]:
            summary.add(v)
        out[name] = {**summary.summary(), "cpu_us": round(cpu[name] * 1e6, 1)}
    diffs = sorted(a - b for a, b in zip(lat["that"], lat["this"], strict=True))
    out["faster_p50_us"] = round(diffs[len(diffs) // 2] / 1000, 1)  # the median of (that - this), pair by pair
    out["less_cpu_us"] = round(out["that"]["cpu_us"] - out["this"]["cpu_us"], 1)
    return out


async def _throughput_phase(tmp: Path, durability: str, clients: list[int], n: int, progress: bool) -> dict[str, Any]:
    """Requests per second of healthz, get-agent and start-run at each client count."""
    hello = _bundle("hello")
    token = _prepare(tmp / "rps", durability, [hello])
    srv = Server(tmp / "rps", durability, tmp / "serve-rps.log")
    out: dict[str, Any] = {}
    try:
        await srv.ready()
        conn = await HttpConn.open("127.0.0.1", srv.port)
        rec = _expect("POST /v1/runs", *await conn.request(
            "POST", "/v1/runs", {"agent": "hello", "input": {"name": "ada"}, "wait": 30}, token), 201)
        await conn.close()
        agent_path = f"/v1/agents/{rec['agent_id']}"

        async def healthz(c: HttpConn, i: int) -> None:
            _expect("GET /healthz", *await c.request("GET", "/healthz"), 200)

        async def get_agent(c: HttpConn, i: int) -> None:
            if _expect(f"GET {agent_path}", *await c.request("GET", agent_path, token=token), 200)["status"] != "completed":
                raise TorporError("GET /v1/agents/{id}: the agent is not the completed one")

        async def start_run(c: HttpConn, i: int) -> None:
            _expect("POST /v1/runs", *await c.request("POST", "/v1/runs", {"agent": "hello", "input": {"name": "ada"}},
                                                      token), 201)

        for name, call in (("healthz", healthz), ("get_agent", get_agent), ("start_run", start_run)):
            for c in clients:
                if progress:
                    print(f"{name}: {n} requests over {c} connections", file=sys.stderr)
                await _load(srv.port, c, min(n, 50), call)  # warm-up: connections, caches
                await srv.idle()
                rps, lat = await _load(srv.port, c, n, call)
                await srv.idle()
                out[f"{name}_c{c}"] = {"requests_per_s": round(rps, 1), "clients": c, **lat.summary()}
    finally:
        srv.stop()
    return out


async def _hibernate_phase(tmp: Path, durability: str, agents: int, clients: int, progress: bool) -> dict[str, Any]:
    """``agents`` runs of ``park`` started over HTTP on one server, each parked; the server's RSS."""
    park = _bundle("park")
    token = _prepare(tmp / "park", durability, [park])
    srv = Server(tmp / "park", durability, tmp / "serve-park.log")
    res: dict[str, Any] = {"agents": agents}
    parked_ids: list[str] = []
    try:
        await srv.ready()
        res["idle_kib"] = srv.memory_kib()
        bar = Progress("park", agents, progress)

        async def spawn(c: HttpConn, i: int) -> None:
            rec = _expect("POST /v1/runs (park)", *await c.request(
                "POST", "/v1/runs", {"agent": "park", "input": {"n": i}, "wait": 30}, token), 201)
            if rec.get("status") != "waiting_approval":
                raise TorporError(f"park run {i} is {rec.get('status')}, not waiting_approval: {rec.get('error')}")
            parked_ids.append(rec["agent_id"])
            bar.update(len(parked_ids))

        t0 = time.perf_counter()
        rps, lat = await _load(srv.port, clients, agents, spawn)
        bar.done()
        await srv.idle()
        res["spawn_s"] = round(time.perf_counter() - t0, 2)
        res["parked_per_s"] = round(rps, 1)
        res["spawn_to_parked"] = lat.summary()
        res["parked_kib"] = srv.memory_kib()
        # Still serving: one of them approved over HTTP wakes from the store and completes.
        conn = await HttpConn.open("127.0.0.1", srv.port)
        try:
            first = parked_ids[0]
            _expect("approve", *await conn.request("POST", f"/v1/agents/{first}/approve", {"note": "bench"}, token), 200)
            done = _expect("wait", *await conn.request("GET", f"/v1/agents/{first}/wait?timeout=30", token=token), 200)
            if done.get("status") != "completed" or "parked" not in (done.get("output") or {}):
                raise TorporError(f"the approved park agent ended {done.get('status')}: {done.get('error')}")
        finally:
            await conn.close()
        res["after_kib"] = srv.memory_kib()
    finally:
        res["server_exit"] = srv.stop()
    # Read back from the store: every other one is parked there.
    from host.runtime.queries import list_agents
    from snapshots.lmdb_store import LmdbStore

    with LmdbStore.open(tmp / "park" / "db", create=False) as store:
        rows = list_agents(store)
    res["stored_waiting_approval"] = sum(1 for r in rows if r.get("status") == "waiting_approval")
    if res["stored_waiting_approval"] != agents - 1:
        raise TorporError(f"{res['stored_waiting_approval']} agents are parked in the store, not {agents - 1}")
    idle, parked = res["idle_kib"], res["parked_kib"]
    res["rss_mib"] = round(parked["VmRSS"] / 1024, 1)
    res["hwm_mib"] = round(parked["VmHWM"] / 1024, 1)
    res["rss_per_agent_kib"] = round((parked["VmRSS"] - idle["VmRSS"]) / agents, 2)
    res["anon_per_agent_kib"] = round((parked.get("RssAnon", 0) - idle.get("RssAnon", 0)) / agents, 2)
    return res


# -- the benchmark --------------------------------------------------------------------------------
def _clients(text: str) -> list[int]:
    """``--clients 1,16``: the concurrent client counts, each a positive number."""
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) <= 0:
        raise ConfigError(f"--clients must be a positive number or a comma-separated list of them, got {text!r}")
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase; the figures with their baselines (see the module docstring)."""
    quick = bool(args.quick)
    against = _against(args.against)
    n = positive("--n", args.n if args.n is not None else (20 if quick else 2000))
    requests = positive("--requests", args.requests if args.requests is not None else (40 if quick else 3000))
    agents = positive("--agents", args.agents if args.agents is not None else (20 if quick else 10_000))
    clients = _clients(args.clients or ("1,4" if quick else "1,16"))
    durabilities = [args.durability] if args.durability else list(DURABILITIES)
    warmup = 5 if quick else 100
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-serve-"))
    load_before = _load_average()
    try:
        latency = [asyncio.run(_latency_phase(tmp, d, n, warmup, args.progress)) for d in durabilities]
        paired = [asyncio.run(_paired_phase(tmp, d, n, warmup, against, args.progress))
                  for d in durabilities] if against is not None else []
        throughput = asyncio.run(_throughput_phase(tmp, durabilities[0], clients, requests, args.progress))
        hibernated = asyncio.run(_hibernate_phase(tmp, durabilities[0], agents, max(clients), args.progress))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    samples: dict[str, Sequence[int]] = {}
    for case in latency:
        samples.update(case.pop("_samples"))
    main = latency[0]
    res: dict[str, Any] = {
        "bench": "serve", "machine": machine(), "durability": durabilities[0], "n": n, "requests": requests,
        "clients": clients, "load_average": {"before": load_before, "after": _load_average()},
        "hello_http_p50_ms": round(main["http"]["p50_us"] / 1000, 3),
        "hello_http_p90_ms": round(main["http"]["p90_us"] / 1000, 3),
        "hello_http_p99_ms": round(main["http"]["p99_us"] / 1000, 3),
        "hello_embedded_p50_ms": round(main["embedded"]["p50_us"] / 1000, 3),
        "hello_p50_ratio": main["p50_ratio"], "hello_added_p50_ms": round(main["added_p50_us"] / 1000, 3),
        "hello_http_cpu_ms": round(main["http_cpu_us"] / 1000, 3),
        "hello_embedded_cpu_ms": round(main["embedded_cpu_us"] / 1000, 3),
        "hello_p50_target_ms": HELLO_P50_TARGET_MS,
        **{f"hello_http_{c['durability']}_p50_ms": round(c["http"]["p50_us"] / 1000, 3) for c in latency},
        **{f"hello_embedded_{c['durability']}_p50_ms": round(c["embedded"]["p50_us"] / 1000, 3) for c in latency},
        "latency": {c["durability"]: c for c in latency},
        "throughput": throughput,
        **{f"{k}_rps": v["requests_per_s"] for k, v in throughput.items()},
        "hibernated": hibernated, "hibernated_agents": hibernated["agents"],
        "hibernated_rss_mib": hibernated["rss_mib"], "hibernated_hwm_mib": hibernated["hwm_mib"],
        "hibernated_rss_target_mib": RSS_TARGET_MIB,
        **({"against": {c["durability"]: c for c in paired}} if paired else {}),
    }

    def draw(plt: Any) -> None:
        _fig, ax = plt.subplots(figsize=(8, 5))
        cdf(ax, samples, f"hello start to completion: over HTTP vs embedded ({n} runs each)", unit="ms")

    res.update(draw_plot(args.plot, draw))
    return res


def _against(text: str | None) -> Path | None:
    """``--against DIR``: another checkout of Torpor, whose server is timed beside this one's."""
    if text is None:
        return None
    tree = Path(text).resolve()
    if not (tree / "host" / "cli" / "__main__.py").is_file():
        raise ConfigError(f"--against must name a checkout of Torpor (a directory with host/cli/), got {text!r}")
    return tree


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def show(r: dict[str, Any]) -> None:
    """Tables: hello latency over HTTP vs embedded; requests per second; the hibernated server's RSS."""
    print("hello, start to completion (ms)")
    print(f"{'case':34} {'n':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for d, c in r["latency"].items():
        for kind, label in (("http", f"over HTTP, {d}"), ("embedded", f"embedded Host.run, {d}")):
            s = c[kind]
            print(f"{label:34} {int(s['n']):>6} {s['p50_us'] / 1000:>8.3f} {s['p90_us'] / 1000:>8.3f} "
                  f"{s['p99_us'] / 1000:>8.3f} {s['max_us'] / 1000:>8.3f}")
        print(f"{'':34} HTTP/embedded p50 {c['p50_ratio']}x, p99 {c['p99_ratio']}x; HTTP adds "
              f"{c['added_p50_us'] / 1000:.3f} ms at p50, {c['added_p99_us'] / 1000:.3f} at p99")
        print(f"{'':34} CPU per run: server {c['http_cpu_us'] / 1000:.3f} ms, embedded "
              f"{c['embedded_cpu_us'] / 1000:.3f} ms (HTTP adds {c['added_cpu_us'] / 1000:.3f})")
    print(f"target: over HTTP p50 ≤ {r['hello_p50_target_ms']} ms; measured {r['hello_http_p50_ms']} ms "
          f"({r['durability']})\n")
    for d, c in (r.get("against") or {}).items():
        print(f"side by side with {c['against']}, {d}, requests alternated: this tree p50 "
              f"{c['this']['p50_us'] / 1000:.3f} ms (server CPU {c['this']['cpu_us'] / 1000:.3f} ms a run), that one "
              f"{c['that']['p50_us'] / 1000:.3f} ms ({c['that']['cpu_us'] / 1000:.3f}); this one faster by "
              f"{c['faster_p50_us'] / 1000:.3f} ms at the median of the pairs, {c['less_cpu_us'] / 1000:.3f} ms less CPU\n")
    print(f"requests per second ({r['requests']} requests a case; latency per request in ms)")
    print(f"{'case':24} {'req/s':>10} {'p50':>8} {'p90':>8} {'p99':>8}")
    for name, c in r["throughput"].items():
        print(f"{name:24} {c['requests_per_s']:>10,.0f} {c['p50_us'] / 1000:>8.3f} {c['p90_us'] / 1000:>8.3f} "
              f"{c['p99_us'] / 1000:>8.3f}")
    h = r["hibernated"]
    print(f"\n{h['agents']:,} agents parked waiting_approval on one server ({h['parked_per_s']:,.0f}/s started over "
          f"HTTP, {h['spawn_s']} s): VmRSS {h['rss_mib']} MiB, VmHWM {h['hwm_mib']} MiB (target < "
          f"{r['hibernated_rss_target_mib']:.0f}); idle before {h['idle_kib']['VmRSS'] / 1024:.1f} MiB; "
          f"{h['rss_per_agent_kib']} KiB RSS per agent ({h['anon_per_agent_kib']} anonymous); "
          f"{h['stored_waiting_approval']:,} parked in the store after the server stopped (one approved, completed)")
    load = r.get("load_average") or {}
    print(f"load average (1 min) {load.get('before')} before, {load.get('after')} after")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
