"""A team's gateway on this machine: replicas of `plano up` behind HAProxy, measured side by side.

Every gateway here is `python -m plano up --port P` of one config file, behind HAProxy run with
bench/haproxy.cfg exactly as the tests run it; the provider is bench/overhead.py's stand-in (its
own process, it answers at once). All HAProxies run at the same time and the load moves from one
to the next in rounds, so the machine's noise (other work on it included) hits each alike.

1. Requests per second through HAProxy to 1 replica and to 3 replicas: Anthropic requests of a
   small Claude Code turn, half of them streamed, from `--concurrency` keep-alive connections;
   every answer is checked. With the team's state (the default when redis-server and PostgreSQL
   are installed): a developer key with a budget, state in Redis, the ledger in PostgreSQL, as
   README's "Run it for a team" sets it up; `--in-process` leaves them out (state in each
   process, no ledger). Also measured: the CPU each process used during the rounds, as a share of
   the machine's cores, which says where the cores went and what limits a third replica.
2. Decisions per second of the two router options, through HAProxy to 1 and 3 replicas: first
   turns with distinct words (the decision cache never answers) from 8 connections.
   - embedded: each replica runs the router model in its own process (`router.model`);
   - shared: one router server for all replicas (`router.endpoint`), here a llama-server-like
     process running the same model through plano's embedded backend, one decision at a time.
   Each router (embedded, or the server) runs on `--router-threads` threads (default 1: on one
   machine, three replicas' llama.cpp threads on 2 threads each would outnumber the cores, and
   llama.cpp's threads wait on each other in spin loops).
   The model is the tiny random Qwen2 of bench/qwen2_gguf.py (byte-level tokens, so a decision
   evaluates tens to hundreds of tokens of a model with ~15,000 times fewer weights than
   Arch-Router-1.5B): the figures show how each option scales on these cores, not a real router's
   rate. `--router-model PATH` measures another GGUF, e.g. the Arch-Router-1.5B shape twin
   bench/router_latency.py builds.

    python bench/team.py [--seconds 24] [--rounds 4] [--concurrency 32] [--router-model PATH]
                         [--router-threads 1] [--in-process] [--part requests|decisions]

Everything runs on 127.0.0.1; scratch files go to a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from overhead import anthropic_body, check_json, check_stream, directive_tag, free_port, reply_pieces, stand_in

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "bench" / "haproxy.cfg"
POSTGRES_BIN = Path(os.environ.get("PLANO_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
ADMIN_KEY = "plano-bench-admin-key-0123456789"
DEVELOPER_KEY = "plano-bench-developer-key-0123456789"
CHUNKS = 20
ROUTED_MODEL = "claude-opus-5-5"  # Claude Code's default: not configured, so plano routes it
ROUTES = [{"name": "code generation", "description": "generating new code snippets, functions, or boilerplate"},
          {"name": "code understanding",
           "description": "understand and explain existing code snippets, functions, or libraries"}]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The processes: replicas, HAProxy, Redis, PostgreSQL, the shared router server.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def wait_ready(process: subprocess.Popen, url: str, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {process.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({url})")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def replicas(config: Path, count: int, workdir: Path, name: str) -> Iterator[tuple[list[str], list[subprocess.Popen]]]:
    """`count` replicas of `plano up` from `config`, each on its own port; yields their host:port
    and processes."""
    processes, addresses = [], []
    try:
        for n in range(count):
            port = free_port()
            with open(workdir / f"{name}-{n + 1}.log", "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "plano", "up", "--config", str(config), "--port", str(port)],
                    stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT))
            addresses.append(f"127.0.0.1:{port}")
        for n, (process, address) in enumerate(zip(processes, addresses)):
            wait_ready(process, f"http://{address}/healthz", f"{name} replica {n + 1} (log: {workdir})")
        yield addresses, processes
    finally:
        for process in processes:
            stop_process(process)


@contextlib.contextmanager
def haproxy(addresses: list[str], workdir: Path, name: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """HAProxy with bench/haproxy.cfg in front of `addresses`; yields its port and process."""
    port = free_port()
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "PLANO_LB_BIND": f"127.0.0.1:{port}",
           **{f"PLANO_REPLICA_{n}": address for n, address in enumerate(addresses, 1)}}
    with open(workdir / f"haproxy-{name}.log", "w") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CONFIG)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}/healthz", f"HAProxy {name}")
        yield port, process
    finally:
        stop_process(process)


@contextlib.contextmanager
def redis(workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                                "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout != b"PONG\n":
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        stop_process(process)


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, subprocess.Popen]]:
    """PostgreSQL in a temporary directory of its own (as Debian's `postgres` user when run as root:
    it refuses root, and then the directory is that user's)."""
    as_root = os.geteuid() == 0
    user = ["runuser", "-u", "postgres", "--"] if as_root else []
    directory = Path(tempfile.mkdtemp(prefix="plano-team-bench-pg-"))
    if as_root:
        shutil.chown(directory, "postgres")
    port = free_port()
    subprocess.run([*user, str(POSTGRES_BIN / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    process = subprocess.Popen([*user, str(POSTGRES_BIN / "postgres"), "-D", str(directory / "data"), "-p", str(port),
                                "-h", "127.0.0.1", "-k", str(directory), "-c", "fsync=off"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("postgres did not start")
            time.sleep(0.1)
        psql = [str(POSTGRES_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q", "-c"]
        subprocess.run([*psql, "CREATE ROLE plano LOGIN"], check=True, capture_output=True)
        subprocess.run([*psql, "CREATE DATABASE plano OWNER plano"], check=True, capture_output=True)
        yield f"postgresql://plano@127.0.0.1:{port}/plano", process
    finally:
        process.terminate()  # SIGTERM: PostgreSQL's smart shutdown
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def _run_router_server(model: str, threads: int, port_pipe: multiprocessing.connection.Connection) -> None:
    """A router server as llama-server or vLLM would be for plano: POST /v1/chat/completions with
    the model card's prompt, answered `{"route": "..."}`. The model runs through plano's embedded
    backend (prefix reuse, constrained answer), one decision at a time, like a one-slot server."""
    import h11
    import trio

    import plano

    backend = plano.EmbeddedRouterBackend(plano.RouterSettings(model=model, threads=threads))
    one_at_a_time = trio.Lock()

    def between(text: str, start: str, end: str) -> Any:
        return json.loads(text.split(start, 1)[1].split(end, 1)[0])

    async def decide(body: bytes) -> bytes:
        prompt = json.loads(body)["messages"][0]["content"]
        routes = tuple(plano.RoutingPreference(r["name"], r["description"])
                       for r in between(prompt, "<routes>\n\n", "\n\n</routes>"))
        conversation = between(prompt, "<conversation>\n\n", "\n\n</conversation>")
        async with one_at_a_time:
            await backend.load(routes)
            choice = await backend.decide(routes, await backend.trim(routes, conversation))
        return json.dumps({"id": "r", "object": "chat.completion", "model": "arch-router", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": json.dumps({"route": choice.name})},
             "finish_reason": "stop"}]}).encode()

    async def connection(stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                http.receive_data(data)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answer = await decide(body)
                await stream.send_all(http.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(answer)))])))
                await stream.send_all(http.send(h11.Data(data=answer)) + http.send(h11.EndOfMessage()))
                http.start_next_cycle()
                body = b""
            elif isinstance(event, h11.ConnectionClosed):
                return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
            port_pipe.send(listeners[0].socket.getsockname()[1])

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    trio.run(main)


@contextlib.contextmanager
def router_server(model: str, threads: int) -> Iterator[tuple[str, int]]:
    """The shared router server in a child process; yields its endpoint and pid."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    process = context.Process(target=_run_router_server, args=(model, threads, child_end), daemon=True)
    process.start()
    try:
        if parent_end not in multiprocessing.connection.wait([parent_end, process.sentinel], timeout=60):
            raise RuntimeError("the router server did not start (see the traceback above)")
        yield f"http://127.0.0.1:{parent_end.recv()}/v1", process.pid
    finally:
        process.terminate()
        process.join(5)


# ═════════════════════════════════════════════════════════════════════════════════════════════
# Configs: the one file every replica of a set runs.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def team_config(upstream_port: int, redis_url: str | None, postgres_url: str | None, router: dict | None) -> str:
    """Two models on the stand-in, routes on both; the team's key, state and ledger when given."""
    prices = {"input": 3, "cached_input": 0.3, "output": 15}  # so that each answer counts against the budget
    config: dict[str, Any] = {
        "llm_providers": [
            {"model": "openai/stub-model", "base_url": f"http://127.0.0.1:{upstream_port}/v1", "access_key": "dummy",
             "default": True, "routing_preferences": ROUTES[1:], "prices": prices},
            {"model": "openai/stub-coder", "base_url": f"http://127.0.0.1:{upstream_port}/v1", "access_key": "dummy",
             "routing_preferences": ROUTES[:1], "prices": prices}],
        "listeners": [{"address": "127.0.0.1", "api_key": ADMIN_KEY}],
        "router": router or {"enabled": False},
    }
    if redis_url:
        config["keys"] = [{"name": "dev", "key": DEVELOPER_KEY, "team": "bench",
                           "budget": {"usd": 1_000_000, "per": "day"}}]
        config["teams"] = [{"name": "bench", "budget": {"usd": 1_000_000, "per": "month"}}]
        config["state"] = {"url": redis_url}
        config["stats"] = {"url": postgres_url}
    else:
        config["stats"] = False
    return json.dumps(config, indent=2)  # JSON is YAML


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The client: raw HTTP/1.1 on keep-alive connections (httpx would cost the 2 cores more than
# HAProxy does), every answer checked.
# ═════════════════════════════════════════════════════════════════════════════════════════════


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {name.strip().lower(): value.strip() for name, value in
               (line.split(":", 1) for line in head[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = bytearray()
    while True:  # chunked: SSE answers
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, headers, bytes(body)
        body += await reader.readexactly(size + 2)
        del body[-2:]


@dataclass
class Tally:
    answers: int = 0
    wrong: list[str] = field(default_factory=list)
    seconds: float = 0.0
    router_ms: list[float] = field(default_factory=list)


Request = Callable[[int], tuple[bytes, Callable[[int, dict, bytes], "str | None"]]]


async def run_load(port: int, key: str, seconds: float, concurrency: int, request: Request, tally: Tally,
                   counter: Iterator[int]) -> None:
    """`concurrency` connections send `request(n)` (body, check) one after another for `seconds`,
    n from `counter`."""
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                body, check = request(next(counter))
                writer.write(b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                             b"anthropic-version: 2023-06-01\r\nx-api-key: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (key.encode(), len(body), body))
                status, headers, raw = await _read_answer(reader)
                problem = check(status, headers, raw)
                if problem:
                    tally.wrong.append(problem)
                else:
                    tally.answers += 1
                    if "x-plano-router-ms" in headers:
                        tally.router_ms.append(float(headers["x-plano-router-ms"]))
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.seconds += time.monotonic() - started


def turn_request(n: int) -> tuple[bytes, Callable[[int, dict, bytes], str | None]]:
    """A small Claude Code turn, streamed every other time; the check reads the whole answer."""
    nonce, stream = f"r{n}", n % 2 == 1
    expected = "".join(reply_pieces(nonce, CHUNKS))
    body = anthropic_body(directive_tag(nonce, CHUNKS), stream)

    def check(status: int, headers: dict, raw: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        return check_stream("anthropic", raw, expected)[0] if stream else check_json("anthropic", json.loads(raw),
                                                                                     expected)
    return body, check


def first_turn_request(n: int) -> tuple[bytes, Callable[[int, dict, bytes], str | None]]:
    """A first turn the router must decide: new words each time, so its decision cache never answers."""
    words = f"write a python function number {n} that parses ISO dates and handles time zone {n % 24}"
    body = json.dumps({"model": ROUTED_MODEL, "max_tokens": 512, "messages": [
        {"role": "user", "content": f"{words} {directive_tag(f'd{n}', 4)}"}]}).encode()

    def check(status: int, headers: dict, raw: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        if headers.get("x-plano-decision") != "router":
            return f"not a router decision: {headers.get('x-plano-decision')} ({raw[:120]!r})"
        return None
    return body, check


# ═════════════════════════════════════════════════════════════════════════════════════════════
# CPU: where the cores went during the rounds.
# ═════════════════════════════════════════════════════════════════════════════════════════════


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    return children


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes and all their descendants (PostgreSQL forks one per connection)."""
    children, total, todo = _children(), 0.0, list(pids)
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy, everything on the machine included."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CPUMeter:
    """CPU seconds per named group of processes over the measured rounds."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.used = {name: 0.0 for name in [*groups, "client (this process)", "everything else"]}
        self.wall = 0.0

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        before = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        client, busy, started = sum(os.times()[:2]), machine_busy_seconds(), time.monotonic()
        yield
        ours = 0.0
        for name, pids in self.groups.items():
            used = cpu_seconds(pids) - before[name]
            self.used[name] += used
            ours += used
        client = sum(os.times()[:2]) - client
        self.used["client (this process)"] += client
        self.used["everything else"] += max(machine_busy_seconds() - busy - ours - client, 0.0)
        self.wall += time.monotonic() - started

    def shares(self) -> dict[str, float]:
        """Each group's CPU as a share of the machine's cores over the wall time measured."""
        return {name: used / (self.wall * os.cpu_count()) for name, used in self.used.items()}


# ═════════════════════════════════════════════════════════════════════════════════════════════
# The run
# ═════════════════════════════════════════════════════════════════════════════════════════════


# Where each call of alternate() starts numbering its requests: no two requests of a run have the
# same words, so no decision comes from a router's cache (a run sends far fewer than 10**7).
_REQUEST_NUMBERS = itertools.count(0, 10**7)


def alternate(targets: dict[str, int], key: str, rounds: int, seconds: float, concurrency: int, request: Request,
              meters: dict[str, CPUMeter] | None = None) -> dict[str, Tally]:
    """Load each target in turn, `rounds` times, `seconds / rounds` each time."""
    tallies, counter = {name: Tally() for name in targets}, itertools.count(next(_REQUEST_NUMBERS))
    for _ in range(rounds):
        for name, port in targets.items():
            with meters[name].measuring() if meters else contextlib.nullcontext():
                asyncio.run(run_load(port, key, seconds / rounds, concurrency, request, tallies[name], counter))
    return tallies


def rate(tally: Tally) -> float:
    return tally.answers / tally.seconds if tally.seconds else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=24, help="load time per target, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--router-model", help="GGUF for the router part (default: the tiny test model)")
    parser.add_argument("--router-threads", type=int, default=1,
                        help="router.threads of each embedded router and of the shared server (default 1)")
    parser.add_argument("--in-process", action="store_true", help="no Redis, no PostgreSQL, no keys")
    parser.add_argument("--part", choices=("requests", "decisions"), help="measure only this part (default: both)")
    args = parser.parse_args()
    team = not args.in_process
    if not shutil.which("haproxy", path="/usr/sbin:/usr/bin"):
        sys.exit("team: HAProxy is not installed (apt-get install haproxy)")
    if team and not (shutil.which("redis-server") and (POSTGRES_BIN / "postgres").exists()):
        sys.exit("team: redis-server or PostgreSQL is missing (apt-get install redis-server postgresql), "
                 "or run with --in-process")
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; {'Redis state, PostgreSQL ledger' if team else 'state in each process'}")
    workdir = Path(tempfile.mkdtemp(prefix="plano-team-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            upstream_port = stack.enter_context(stand_in())
            redis_url = postgres_url = None
            shared_pids: dict[str, list[int]] = {}
            if team:
                redis_url, redis_process = stack.enter_context(redis(workdir))
                postgres_url, postgres_process = stack.enter_context(postgres())
                shared_pids = {"Redis": [redis_process.pid], "PostgreSQL": [postgres_process.pid]}
            if args.part in (None, "requests"):
                requests_per_second(stack, workdir, upstream_port, redis_url, postgres_url, shared_pids, args)
            if args.part in (None, "decisions"):
                decisions_per_second(stack, workdir, upstream_port, redis_url, postgres_url, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def requests_per_second(stack: contextlib.ExitStack, workdir: Path, upstream_port: int, redis_url: str | None,
                        postgres_url: str | None, shared_pids: dict[str, list[int]], args: Any) -> None:
    config = workdir / "serving.yaml"
    config.write_text(team_config(upstream_port, redis_url, postgres_url, None))
    addresses, processes = stack.enter_context(replicas(config, 3, workdir, "serving"))
    one_port, one_haproxy = stack.enter_context(haproxy(addresses[:1], workdir, "one"))
    three_port, three_haproxy = stack.enter_context(haproxy(addresses, workdir, "three"))
    stand_in_pid = [p.pid for p in multiprocessing.active_children()]  # its only child process so far
    meters = {name: CPUMeter({"replicas": [p.pid for p in processes], "HAProxy": [haproxy_process.pid],
                              "stand-in provider": stand_in_pid, **shared_pids})
              for name, haproxy_process in (("1 replica", one_haproxy), ("3 replicas", three_haproxy))}
    targets = {"1 replica": one_port, "3 replicas": three_port}
    key = DEVELOPER_KEY if redis_url else ADMIN_KEY
    warm_up = alternate(targets, key, 1, 2, args.concurrency, turn_request)
    tallies = alternate(targets, key, args.rounds, args.seconds, args.concurrency, turn_request, meters)
    print(f"\n1. Requests per second through HAProxy ({args.concurrency} connections, half streamed, "
          f"{args.seconds:.0f} s each in {args.rounds} alternating rounds)\n")
    print(f"{'':<12}{'requests/s':>12}{'answers':>9}{'wrong':>7}")
    for name, tally in tallies.items():
        print(f"{name:<12}{rate(tally):>12.0f}{tally.answers:>9}{len(tally.wrong):>7}")
        for problem in tally.wrong[:3]:
            print(f"    {problem}")
    print(f"\n3 replicas / 1 replica: {rate(tallies['3 replicas']) / rate(tallies['1 replica']):.2f}x")
    print(f"\nCPU during the rounds, share of the machine's {os.cpu_count()} cores:\n")
    names = list(next(iter(meters.values())).used)
    print(f"{'':<24}" + "".join(f"{name:>12}" for name in meters))
    for name in names:
        print(f"{name:<24}" + "".join(f"{meter.shares()[name]:>12.0%}" for meter in meters.values()))
    print(f"{'total':<24}" + "".join(f"{sum(meter.shares().values()):>12.0%}" for meter in meters.values()))
    if postgres_url:
        answers = sum(tally.answers for tally in (*warm_up.values(), *tallies.values()))
        print(f"\nThe ledger in PostgreSQL: {ledger_rows(postgres_url, answers)} rows for the {answers} answers")


def ledger_rows(url: str, expected: int) -> int:
    """The rows in the ledger once it holds `expected` (the replicas write in batches), or after 15 s."""
    import psycopg
    deadline = time.monotonic() + 15
    with psycopg.connect(url) as connection:
        while True:
            rows = connection.execute("SELECT count(*) FROM plano_usage").fetchone()[0]
            if rows >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def decisions_per_second(stack: contextlib.ExitStack, workdir: Path, upstream_port: int, redis_url: str | None,
                         postgres_url: str | None, args: Any) -> None:
    model = args.router_model
    if model is None:
        from qwen2_gguf import write_tiny_qwen2_gguf
        model = str(write_tiny_qwen2_gguf(workdir / "tiny-qwen2.gguf"))
    endpoint, _ = stack.enter_context(router_server(model, args.router_threads))
    targets = {}
    for option, router in (("embedded", {"model": model, "threads": args.router_threads}),
                           ("shared", {"endpoint": endpoint, "model": "arch-router"})):
        config = workdir / f"{option}.yaml"
        # A request may wait for its replica's (or the server's) one decision at a time behind the
        # others: long enough that none falls back to the default model while it waits.
        config.write_text(team_config(upstream_port, redis_url, postgres_url, {**router, "timeout_ms": 300000}))
        addresses, _ = stack.enter_context(replicas(config, 3, workdir, option))
        for address in addresses:  # the embedded router loads in the background: wait for it
            deadline = time.monotonic() + 120
            while httpx.get(f"http://{address}/healthz", timeout=5).json()["router"] != "ready":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {option} router of {address} did not load")
                time.sleep(0.2)
        targets[f"{option}, 1 replica"] = stack.enter_context(haproxy(addresses[:1], workdir, f"{option}-one"))[0]
        targets[f"{option}, 3 replicas"] = stack.enter_context(haproxy(addresses, workdir, f"{option}-three"))[0]
    key = DEVELOPER_KEY if redis_url else ADMIN_KEY
    alternate(targets, key, 1, len(targets), 8, first_turn_request)  # warm-up: each router's route-set prefix
    tallies = alternate(targets, key, args.rounds, args.seconds, 8, first_turn_request)
    print(f"\n2. Router decisions per second through HAProxy (8 connections, first turns with new words; model "
          f"{Path(model).name})\n")
    print(f"{'':<24}{'decisions/s':>12}{'decisions':>10}{'not routed':>11}{'router ms p50':>15}")
    for name, tally in tallies.items():
        p50 = statistics.median(tally.router_ms) if tally.router_ms else float("nan")
        print(f"{name:<24}{rate(tally):>12.2f}{tally.answers:>10}{len(tally.wrong):>11}{p50:>15.0f}")
        for problem in tally.wrong[:3]:
            print(f"    {problem}")
    for option in ("embedded", "shared"):
        print(f"{option}: 3 replicas / 1 replica: "
              f"{rate(tallies[f'{option}, 3 replicas']) / rate(tallies[f'{option}, 1 replica']):.2f}x")
    print(f"3 replicas, embedded / shared: "
          f"{rate(tallies['embedded, 3 replicas']) / rate(tallies['shared, 3 replicas']):.2f}x")
    print(textwrap.fill(f"Each embedded router decides one conversation at a time on {args.router_threads} "
                        f"thread(s) (router.threads), in each replica; the shared server, on as many, decides one "
                        f"at a time for all replicas. Here all of them share this machine's {os.cpu_count()} cores.",
                        100))


if __name__ == "__main__":
    sys.exit(main())
