"""stigmer-broker benchmarks: every figure is a ratio against a floor measured in the same run.

Runs its own daemons in a private temporary home (never the user's), prints a
table and writes bench/results.json. These machines are noisy: cases that are
compared run alternately, in rounds, and the table quotes medians and ratios.

    python bench/run.py            # the full run (make bench)
    python bench/run.py --smoke    # tiny counts, to keep it from rotting (the test suite)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
MAX_USES = 2**31  # the protocol's bound: a token that lasts the whole run


# ------------------------------------------------------------------ measuring


def summary(latencies_ns: list[int], elapsed_s: float, count: int) -> dict[str, float]:
    ordered = sorted(latencies_ns)
    return {
        "p50_us": ordered[len(ordered) // 2] / 1000,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
        "throughput_per_s": count / elapsed_s if elapsed_s > 0 else 0.0,
        "count": count,
    }


def timed_calls(call: Callable[[], object], count: int) -> tuple[list[int], float]:
    latencies = []
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(count):
        t0 = clock()
        call()
        latencies.append(clock() - t0)
    return latencies, (clock() - start) / 1e9


def alternate(cases: dict[str, Callable[[int], tuple[list[int], float]]], total: int,
              rounds: int) -> dict[str, dict[str, float]]:
    """Run each case ``total`` times in ``rounds`` alternating chunks; summarise each."""
    lat: dict[str, list[int]] = {name: [] for name in cases}
    elapsed: dict[str, float] = dict.fromkeys(cases, 0.0)
    chunk = max(1, total // rounds)
    for _ in range(rounds):
        for name, run in cases.items():
            got, secs = run(chunk)
            lat[name] += got
            elapsed[name] += secs
    return {name: summary(lat[name], elapsed[name], len(lat[name])) for name in cases}


@contextmanager
def pinned(pids: list[int], cpu: int = 0) -> Iterator[bool]:
    """Every thread of this process and of ``pids`` on one CPU, then back where they were.

    On a small VM a wakeup that crosses CPUs costs tens of microseconds, and whether
    it crosses is the scheduler's coin toss: pinned, a latency row is the work of the
    client and the server alone. Yields False (and pins nothing) where the OS cannot.
    """
    if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
        yield False
        return
    everyone = [os.getpid(), *pids]
    allowed = {pid: os.sched_getaffinity(pid) for pid in everyone}

    def place(pid: int, cpus: set[int]) -> None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), cpus)

    for pid in everyone:
        place(pid, {cpu})
    try:
        yield True
    finally:
        for pid in everyone:
            place(pid, allowed[pid])


# ---------------------------------------------------------------- the daemons


def context_variables() -> tuple[dict[str, str], dict[str, str]]:
    """30 variables, 10 of them secret, about 3 KB in all."""
    plain = {f"SETTING_{i:02d}": "v" * 90 for i in range(20)}
    secret = {f"SECRET_{i:02d}": "s" * 90 for i in range(10)}
    return plain, secret


def masking_secrets() -> dict[str, str]:
    """Ten distinct API-key-like secrets of 40 characters: what masking has to find."""
    import hashlib

    return {f"API_KEY_{i}": "sk-" + hashlib.sha256(f"bench-{i}".encode()).hexdigest()[:37]
            for i in range(10)}


@contextmanager
def broker(home: Path, sock: Path, *, key: str | None = None, store_url: str | None = None,
           metrics: str | None = None) -> Iterator[dict[str, str]]:
    """A daemon started with `stigmer-broker start` (its key in the home's key file unless
    ``key``; the SQLite store unless ``store_url``; metrics served at ``metrics``, an
    address as --metrics takes it), stopped afterwards."""
    env = {**os.environ, "STIGMER_HOME": str(home), "STIGMER_BROKER_SOCKET": str(sock),
           "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    for name, value in (("STIGMER_ENCRYPTION_KEY", key), ("STIGMER_STORE_URL", store_url),
                        ("STIGMER_METRICS", metrics)):
        env.pop(name, None)
        if value is not None:
            env[name] = value
    subprocess.run([PY, "-m", "stigmer.broker", "start"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield env
    finally:
        subprocess.run([PY, "-m", "stigmer.broker", "stop"], env=env,
                       stdout=subprocess.DEVNULL, check=False)


def scrape(path: Path) -> str:
    """The text a scrape of the metrics socket at ``path`` gets (HTTP/1.0, read whole)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"the metrics endpoint answered {head[:40]!r}")
    return body.decode()


def daemon_pid(sock: Path) -> int:
    from stigmer.client import Client

    with Client(sock) as c:
        return c.status().pid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def create_contexts(sock: Path, count: int, prefix: str) -> tuple[str, float]:
    """Create ``count`` contexts; return the last token and contexts per second."""
    from stigmer.client import Client, variables

    plain, secret = context_variables()
    runtime = variables(plain, secret)
    token = ""
    with Client(sock) as c:
        start = time.perf_counter()
        for i in range(count):
            token = c.create_context(f"{prefix}-{i}", runtime=runtime, ttl_s=3600,
                                     token_ttl_s=3600).token
        secs = time.perf_counter() - start
    return token, count / secs


def create_rates(sock: Path, creators: int, per: int, rounds: int) -> dict[str, float]:
    """Median contexts/s of one client creating ``creators * per`` contexts and of
    ``creators`` clients (threads) creating ``per`` each at once, alternately."""
    import threading

    from stigmer.client import Client, variables

    runtime = variables(*context_variables())
    rates: dict[str, list[float]] = {"1_client": [], f"{creators}_clients": []}
    for r in range(rounds):
        for name, width in (("1_client", 1), (f"{creators}_clients", creators)):
            clients = [Client(sock) for _ in range(width)]
            for c in clients:
                c.connect()
            go = threading.Barrier(width + 1)

            def work(i: int, c: Client, count: int = creators * per // width,
                     go: threading.Barrier = go, prefix: str = f"rate-{name}-{r}") -> None:
                go.wait()
                for j in range(count):
                    c.create_context(f"{prefix}-{i}-{j}", runtime=runtime, ttl_s=3600)

            threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
            for t in threads:
                t.start()
            go.wait()
            start = time.perf_counter()
            for t in threads:
                t.join()
            rates[name].append(creators * per / (time.perf_counter() - start))
            for c in clients:
                c.close()
    return {name: round(statistics.median(v), 1) for name, v in rates.items()}


# --------------------------------------------------------------------- the floor


def serve_floor(kind: str, path: str) -> None:
    """A floor: a server that answers each frame (our framing) with a pre-encoded reply of
    the broker's size, and nothing else. ``kind`` is how it serves: ``blocking`` (a thread
    per connection, one recv/sendall loop), ``protocol`` (an asyncio.Protocol on uvloop:
    the strict floor for a Python daemon) or ``anyio`` (anyio streams on uvloop, the
    runtime the broker's connection tasks use)."""
    import anyio
    import msgspec

    # our messages only encode the replies once, here; serving uses none of our code
    from stigmer.broker.protocol import ContextFetched, Variable, Welcome
    from stigmer.client import variables as make_vars

    class FrameReader:
        """A bare 4-byte length-prefix splitter (not the broker's, which checks more)."""

        def __init__(self) -> None:
            self.buffer = bytearray()

        def feed(self, data: bytes) -> None:
            self.buffer += data

        def next_body(self) -> bytes | None:
            if len(self.buffer) < 4:
                return None
            end = 4 + int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < end:
                return None
            body = bytes(self.buffer[4:end])
            del self.buffer[:end]
            return body

    plain, secret = context_variables()
    sample: dict[str, Variable] = make_vars(plain, secret)
    encode = msgspec.msgpack.encode

    class IdOnly(msgspec.Struct):
        id: int = 0

    id_of = msgspec.msgpack.Decoder(IdOnly).decode

    def split(message: Any) -> tuple[bytes, bytes]:
        marker = 0x7FFFFFFF  # encodes as 0xce + 4 bytes: find it and cut around it
        body = encode(message.__class__(**{**msgspec.structs.asdict(message), "id": marker}))
        at = body.index(encode(marker))
        return body[:at], body[at + 5:]

    welcome = split(Welcome(id=0, version=1, server_version="floor"))
    reply = split(ContextFetched(id=0, execution_id="floor", expires_at=0.0, variables=sample))

    def answer(reader: Any, first: list[bool]) -> bytes:
        out = b""
        while (body := reader.next_body()) is not None:
            head, tail = welcome if first[0] else reply
            first[0] = False
            frame = head + encode(id_of(body).id) + tail
            out += len(frame).to_bytes(4, "big") + frame
        return out

    if kind == "blocking":
        import threading

        def serve_one(conn: socket.socket) -> None:
            reader, first = FrameReader(), [True]
            with conn:
                while data := conn.recv(65536):
                    reader.feed(data)
                    if out := answer(reader, first):
                        conn.sendall(out)

        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(128)
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    if kind == "protocol":
        import asyncio

        class Floor(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                self.reader, self.first = FrameReader(), [True]

            def data_received(self, data: bytes) -> None:
                self.reader.feed(data)
                if out := answer(self.reader, self.first):
                    self.transport.write(out)

        async def protocol_main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(Floor, path)
            print("ready", flush=True)
            await server.serve_forever()

        try:
            import uvloop

            uvloop.run(protocol_main())
        except ImportError:
            asyncio.run(protocol_main())
        return

    async def handle(stream: Any) -> None:
        reader = FrameReader()
        first = True
        async with stream:
            while True:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                reader.feed(data)
                while (body := reader.next_body()) is not None:
                    head, tail = welcome if first else reply
                    first = False
                    out = head + encode(id_of(body).id) + tail
                    await stream.send(len(out).to_bytes(4, "big") + out)

    async def main() -> None:
        listener = await anyio.create_unix_listener(path, mode=0o600)
        print("ready", flush=True)
        await listener.serve(handle)

    options: dict[str, Any] = {}
    try:
        import uvloop

        options["use_uvloop"] = True
    except ImportError:
        pass
    anyio.run(main, backend="asyncio", backend_options=options)


@contextmanager
def floor(path: Path, kind: str = "anyio") -> Iterator[int]:
    """A floor server (see :func:`serve_floor`) on ``path``; yields its pid."""
    proc = subprocess.Popen([PY, str(Path(__file__)), "--floor-server", kind, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    try:
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------- redis


@contextmanager
def peer_server(binary_name: str, path: Path, *args: str) -> Iterator[int | None]:
    """A C server of another project on a private Unix socket at ``path``; yields its pid
    (None when it is not installed): ``args`` are its arguments."""
    binary = shutil.which(binary_name)
    if binary is None:
        yield None
        return
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if path.exists():
                break
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def redis(path: Path) -> contextlib.AbstractContextManager[int | None]:
    return peer_server("redis-server", path, "--port", "0", "--unixsocket", str(path),
                       "--unixsocketperm", "700", "--save", "", "--appendonly", "no")


def ssh_agent(path: Path) -> contextlib.AbstractContextManager[int | None]:
    """A private ``ssh-agent -D -a PATH`` (a C daemon on a Unix socket)."""
    return peer_server("ssh-agent", path, "-D", "-a", str(path))


class RespClient:
    """A plain RESP client: GET over a Unix socket, nothing more."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def command(self, *parts: bytes) -> bytes:
        msg = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(msg)
        data = self.sock.recv(65536)
        if data.startswith(b"$"):
            header, _, rest = data.partition(b"\r\n")
            need = int(header[1:]) + 2
            while len(rest) < need:
                rest += self.sock.recv(65536)
            return rest[:-2]
        return data


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _recv_frame(sock: socket.socket) -> bytes:
    return _recv_exact(sock, int.from_bytes(_recv_exact(sock, 4), "big"))


class AgentClient:
    """SSH2_AGENTC_REQUEST_IDENTITIES (11) over the agent's socket, the reply read whole."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def identities(self) -> bytes:
        self.sock.sendall(b"\x00\x00\x00\x01\x0b")
        return _recv_frame(self.sock)


class RawFetch:
    """A fetch with no client library: a pre-encoded request, the reply read, not decoded
    (with :class:`stigmer.client.Client` beside it: the client's share of a fetch)."""

    def __init__(self, path: Path, token: str) -> None:
        import msgspec

        from stigmer.broker.protocol import PROTOCOL_VERSION, FetchContext, Hello

        def frame(message: Any) -> bytes:
            body = msgspec.msgpack.encode(message)
            return len(body).to_bytes(4, "big") + body

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.sendall(frame(Hello(id=1, version=PROTOCOL_VERSION, client="bench")))
        _recv_frame(self.sock)
        self.request = frame(FetchContext(id=2, token=token))

    def fetch(self) -> bytes:
        self.sock.sendall(self.request)
        return _recv_frame(self.sock)


def peer_rows(peer: str, row: str, cases: dict[str, Callable[[int], tuple[list[int], float]]],
              pids: list[int], n: int, rounds: int) -> dict[str, Any]:
    """A peer's rows (``peer_<peer>``, and pinned), and the fetch's ratios to its ``row``."""
    free = alternate(cases, n, rounds)
    with pinned(pids) as could:
        on_one = alternate(cases, n, rounds) if could else {}
    rows: dict[str, Any] = {f"peer_{peer}": free, f"peer_{peer}_pinned": on_one}
    for suffix, got in (("", free), ("_pinned", on_one)):
        if got:
            rows[f"ratio_fetch_p50_vs_{peer}{suffix}"] = (got["fetch"]["p50_us"]
                                                         / got[row]["p50_us"])
            rows[f"ratio_fetch_raw_client_p50_vs_{peer}{suffix}"] = (
                got["fetch_raw_client"]["p50_us"] / got[row]["p50_us"])
    return rows


# -------------------------------------------------------------------- workers


def worker(kind: str, target: str, token: str, count: int) -> None:
    """One of the concurrent client processes: warm up, wait for "go", fetch, report."""
    from stigmer.client import Client

    with Client(Path(target)) as c:
        for _ in range(50):
            c.fetch_context(token)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        for _ in range(count):
            c.fetch_context(token)
        end = time.monotonic()
    print(json.dumps({"start": start, "end": end, "count": count}), flush=True)


def concurrent_throughput(target: Path, token: str, clients: int, per_client: int) -> float:
    procs = [subprocess.Popen([PY, str(Path(__file__)), "--worker", "fetch", str(target), token,
                               str(per_client)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(clients)]
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return float(sum(r["count"] for r in results) / span)


# ------------------------------------------------------------------------ CLI


def wall_times(commands: dict[str, list[str]], runs: int, env: dict[str, str]
               ) -> dict[str, float]:
    """Median wall time (ms) of each command, run alternately."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def compile_bytecode(env: dict[str, str]) -> None:
    """Write the bytecode of stigmer's modules, as an install does: start-up figures
    must not count compiling them (PYTHONDONTWRITEBYTECODE, or a fresh checkout)."""
    code = ("import compileall, stigmer.broker, stigmer.client\n"
            "for package in (stigmer.broker, stigmer.client):\n"
            "    for path in package.__path__:\n"
            "        compileall.compile_dir(path, quiet=1)\n")
    subprocess.run([PY, "-c", code], env=env, stdout=subprocess.DEVNULL, check=False)


def write_text_file(path: Path, size: int) -> None:
    """``size`` bytes of log-like text (no secret in it: the scan finds nothing)."""
    line = b"2026-11-22T08:00:00Z INFO worker step=42 status=ok latency_ms=12.5 msg=done\n"
    block = line * ((1 << 20) // len(line) + 1)
    with path.open("wb") as f:
        written = 0
        while written < size:
            chunk = block[:size - written]
            f.write(chunk)
            written += len(chunk)


def pipe_throughputs(commands: dict[str, list[str]], size: int, runs: int,
                     env: dict[str, str], envs: dict[str, dict[str, str]] | None = None
                     ) -> dict[str, float]:
    """Median MiB/s of each command's stdout, read to the end through a pipe, alternately
    (``envs`` gives some commands an env of their own). Their stdin is a pipe held open
    until the output ends, as an MCP client holds a server's."""
    rates: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, env=(envs or {}).get(name, env), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert proc.stdin is not None
            assert proc.stdout is not None
            got, fd = 0, proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 20):
                got += len(chunk)
            proc.stdin.close()
            proc.stdout.close()
            proc.wait()
            assert got == size, (name, got, size)
            rates[name].append(size / (1 << 20) / (time.perf_counter() - t0))
    return {name: round(statistics.median(v), 1) for name, v in rates.items()}


def write_mcp_replies(path: Path, size: int) -> None:
    """``size`` bytes of MCP tool results, one JSON-RPC message a line, each a 4 KiB log in
    a text block (its newlines escaped, so the proxy parses every message). Compact, as
    the proxy writes them: a message with nothing to mask comes out byte for byte."""
    log = "\n".join(f"2026-11-22T08:00:{i % 60:02d}Z INFO worker step={i} status=ok "
                     "latency_ms=12.5 msg=done" for i in range(48))
    with path.open("wb") as f:
        written, i = 0, 0
        while written < size:
            line = json.dumps({"jsonrpc": "2.0", "id": i, "result": {"content": [
                {"type": "text", "text": log}]}}, separators=(",", ":")).encode() + b"\n"
            line = line[:size - written] if written + len(line) > size else line
            f.write(line)
            written += len(line)
            i += 1


def heavy_modules_loaded(env: dict[str, str]) -> list[str]:
    code = ("import sys, stigmer.client; print(','.join(sorted({m.split('.')[0] for m in "
            "sys.modules} & {'keyring', 'aiosqlite', 'cryptography', 'uvloop'})))")
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


# ------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (for the tests)")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--floor-server", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--fleet-only", action="store_true",
                        help="only the fleet (PostgreSQL) rows, merged into --out")
    args = parser.parse_args()
    if args.floor_server:
        serve_floor(*args.floor_server)
        return
    if args.worker:
        kind, target, token, count = args.worker
        worker(kind, target, token, int(count))
        return

    from stigmer.client import Client, variables

    n = 200 if args.smoke else 20000
    rounds = 4 if args.smoke else 10
    concurrent = 2 if args.smoke else 16
    big = 50 if args.smoke else 10000
    cli_runs = 3 if args.smoke else 21
    rows: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    tmp = Path(tempfile.mkdtemp(prefix="sbb-", dir="/tmp"))
    os.chmod(tmp, 0o700)
    sys.path.insert(0, str(HERE))
    from fleet import fleet_rows  # type: ignore[import-not-found]

    if args.fleet_only:
        out = Path(args.out)
        rows = json.loads(out.read_text()) if out.exists() else rows
        try:
            rows["fleet"] = fleet_rows(tmp, broker, smoke=args.smoke)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        print(json.dumps(rows["fleet"], indent=2))
        return
    try:
        small_home, big_home = tmp / "small", tmp / "big"
        small_sock, big_sock = tmp / "s" / "b.sock", tmp / "g" / "b.sock"
        # the small broker's twin with --metrics: fetch p50 with metrics on against off
        metrics_home, metrics_sock = tmp / "metrics", tmp / "m" / "b.sock"
        metrics_endpoint = tmp / "m" / "metrics.sock"
        floor_sock = tmp / "f" / "f.sock"  # the strict floor: a uvloop asyncio.Protocol
        blocking_sock = tmp / "f" / "k.sock"
        anyio_sock = tmp / "f" / "a.sock"
        floor_sock.parent.mkdir(mode=0o700)
        with broker(small_home, small_sock) as env, broker(big_home, big_sock), \
                broker(metrics_home, metrics_sock, metrics=f"unix:{metrics_endpoint}"), \
                floor(floor_sock, "protocol") as floor_pid, \
                floor(blocking_sock, "blocking") as blocking_pid, \
                floor(anyio_sock, "anyio") as anyio_pid:
            servers = [daemon_pid(small_sock), daemon_pid(big_sock), daemon_pid(metrics_sock),
                       floor_pid, blocking_pid, anyio_pid]
            token, _ = create_contexts(small_sock, 10, "small")
            metrics_token, _ = create_contexts(metrics_sock, 10, "small")
            big_token, create_rate = create_contexts(big_sock, big, "big")
            rows["create_contexts_per_s"] = round(create_rate, 1)

            with Client(small_sock) as b, Client(floor_sock) as f, Client(big_sock) as g, \
                    Client(blocking_sock) as fk, Client(anyio_sock) as fa, \
                    Client(metrics_sock) as m:
                raw = RawFetch(small_sock, token)
                raw_floor = RawFetch(floor_sock, token)  # the floor's own raw-client figure
                # a bounded token: each use is committed (fsync) before the reply leaves
                bounded = b.issue_token("small-9", ttl_s=3600, max_uses=MAX_USES).token
                # granted to this process (the broker's own uid): fetched by execution id
                b.create_context("small-self", runtime=variables(*context_variables()),
                                 ttl_s=3600, runners=["self"])
                for c, t in ((b, token), (f, token), (g, big_token), (b, bounded),
                             (fk, token), (fa, token), (m, metrics_token)):
                    for _ in range(200 if not args.smoke else 20):
                        c.fetch_context(t)
                for _ in range(200 if not args.smoke else 20):
                    b.fetch_context(execution_id="small-self")
                cases = {
                    "floor": lambda k: timed_calls(lambda: f.fetch_context(token), k),
                    "floor_blocking": lambda k: timed_calls(lambda: fk.fetch_context(token), k),
                    "floor_anyio": lambda k: timed_calls(lambda: fa.fetch_context(token), k),
                    "floor_raw_client": lambda k: timed_calls(raw_floor.fetch, k),
                    "fetch_raw_client": lambda k: timed_calls(raw.fetch, k),
                    "fetch": lambda k: timed_calls(lambda: b.fetch_context(token), k),
                    "fetch_10k": lambda k: timed_calls(lambda: g.fetch_context(big_token), k),
                    "fetch_max_uses": lambda k: timed_calls(lambda: b.fetch_context(bounded),
                                                            max(1, k // 10)),
                    "fetch_metrics_on": lambda k: timed_calls(
                        lambda: m.fetch_context(metrics_token), k),
                    "fetch_identity": lambda k: timed_calls(
                        lambda: b.fetch_context(execution_id="small-self"), k),
                }
                one = alternate(cases, n, rounds)
                with pinned(servers) as could:  # the same, client and servers on one CPU
                    one_pinned = alternate(cases, n, rounds) if could else {}
            rows["one_client"] = one
            rows["one_client_pinned"] = one_pinned
            if one_pinned:
                rows["ratio_fetch_p50_vs_floor_raw_client_pinned"] = (
                    one_pinned["fetch"]["p50_us"] / one_pinned["floor_raw_client"]["p50_us"])
                rows["client_share_of_floor_p50_us_pinned"] = (
                    one_pinned["floor"]["p50_us"] - one_pinned["floor_raw_client"]["p50_us"])
                rows["ratio_fetch_p50_vs_floor_pinned"] = (one_pinned["fetch"]["p50_us"]
                                                           / one_pinned["floor"]["p50_us"])
                rows["ratio_fetch_raw_client_p50_vs_floor_raw_client_pinned"] = (
                    one_pinned["fetch_raw_client"]["p50_us"]
                    / one_pinned["floor_raw_client"]["p50_us"])
                rows["client_share_of_fetch_p50_us_pinned"] = (
                    one_pinned["fetch"]["p50_us"] - one_pinned["fetch_raw_client"]["p50_us"])
            # what a runner sees: a fetch through the library against the fastest round trip
            # a Python client and server can make (the strict floor through a raw client)
            rows["ratio_fetch_p50_vs_floor_raw_client"] = (one["fetch"]["p50_us"]
                                                           / one["floor_raw_client"]["p50_us"])
            # "floor" is the strict one: a uvloop asyncio.Protocol answering pre-encoded bytes
            rows["ratio_fetch_p50_vs_floor"] = one["fetch"]["p50_us"] / one["floor"]["p50_us"]
            rows["ratio_fetch_p50_vs_blocking_floor"] = (one["fetch"]["p50_us"]
                                                         / one["floor_blocking"]["p50_us"])
            rows["ratio_fetch_p50_vs_anyio_floor"] = (one["fetch"]["p50_us"]
                                                      / one["floor_anyio"]["p50_us"])
            # the server alone: the same raw client against the broker and the strict floor
            rows["ratio_fetch_raw_client_p50_vs_floor_raw_client"] = (
                one["fetch_raw_client"]["p50_us"] / one["floor_raw_client"]["p50_us"])
            rows["client_share_of_fetch_p50_us"] = (one["fetch"]["p50_us"]
                                                    - one["fetch_raw_client"]["p50_us"])
            rows["client_share_of_floor_p50_us"] = (one["floor"]["p50_us"]
                                                    - one["floor_raw_client"]["p50_us"])
            rows["ratio_fetch_10k_vs_10_p50"] = (one["fetch_10k"]["p50_us"]
                                                 / one["fetch"]["p50_us"])
            rows["ratio_fetch_max_uses_vs_unlimited_p50"] = (one["fetch_max_uses"]["p50_us"]
                                                             / one["fetch"]["p50_us"])
            rows["ratio_fetch_identity_vs_token_p50"] = (one["fetch_identity"]["p50_us"]
                                                         / one["fetch"]["p50_us"])
            # the same daemon and contexts, with --metrics: every fetch counted and timed.
            # Two processes: two daemons started alike, both without metrics, have been
            # seen to differ by up to 1.35x from one start to the next on the 2-core
            # machine, so read this ratio across runs, not from one
            rows["ratio_fetch_metrics_on_vs_off_p50"] = (one["fetch_metrics_on"]["p50_us"]
                                                         / one["fetch"]["p50_us"])
            if one_pinned:
                rows["ratio_fetch_metrics_on_vs_off_p50_pinned"] = (
                    one_pinned["fetch_metrics_on"]["p50_us"] / one_pinned["fetch"]["p50_us"])
            # it served, and counted what it was asked (request figures are published once
            # a second, so a scrape right after the fetches may not have them yet)
            for _ in range(10):
                scraped = scrape(metrics_endpoint)
                if 'op="FetchContext",outcome="ok"' in scraped:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("the metrics endpoint did not count the fetches")
            rows["metrics_scrape_bytes"] = len(scraped)

            per = max(1, n // concurrent)
            tput: dict[str, list[float]] = {"floor": [], "fetch": []}
            for _ in range(3 if not args.smoke else 1):
                tput["floor"].append(concurrent_throughput(floor_sock, token, concurrent, per))
                tput["fetch"].append(concurrent_throughput(small_sock, token, concurrent, per))
            rows["concurrent"] = {"clients": concurrent,
                                  "floor_per_s": statistics.median(tput["floor"]),
                                  "fetch_per_s": statistics.median(tput["fetch"])}
            rows["ratio_fetch_throughput_vs_floor"] = (rows["concurrent"]["fetch_per_s"]
                                                       / rows["concurrent"]["floor_per_s"])
            rows["daemon_rss_kib_10k_contexts" if not args.smoke else "daemon_rss_kib"] = \
                rss_kib(daemon_pid(big_sock))
            rows["daemon_rss_kib_10_contexts"] = rss_kib(daemon_pid(small_sock))
            # creation with concurrency: writes that queue up share a commit (group commit)
            creates = create_rates(big_sock, 8, 5 if args.smoke else 50, 1 if args.smoke else 3)
            rows["create_concurrency_per_s"] = creates
            rows["ratio_create_8_clients_vs_1"] = creates["8_clients"] / creates["1_client"]
            rows["create_1_client_per_s"] = creates["1_client"]

            with ssh_agent(tmp / "agent.sock") as agent_pid:
                if agent_pid:
                    agent = AgentClient(tmp / "agent.sock")
                    with Client(small_sock) as b:
                        rows.update(peer_rows("ssh_agent", "ssh_agent_identities", {
                            "ssh_agent_identities": lambda k: timed_calls(agent.identities, k),
                            "fetch": lambda k: timed_calls(lambda: b.fetch_context(token), k),
                            "fetch_raw_client": lambda k: timed_calls(raw.fetch, k),
                        }, [servers[0], agent_pid], n, rounds))
                else:
                    rows["peer_ssh_agent"] = "skipped: ssh-agent is not installed"

            with redis(tmp / "r.sock") as redis_pid:
                if redis_pid:
                    r = RespClient(tmp / "r.sock")
                    r.command(b"SET", b"ctx", b"x" * 3000)
                    with Client(small_sock) as b:
                        rows.update(peer_rows("redis", "redis_get", {
                            "redis_get": lambda k: timed_calls(lambda: r.command(b"GET", b"ctx"),
                                                               k),
                            "fetch": lambda k: timed_calls(lambda: b.fetch_context(token), k),
                            "fetch_raw_client": lambda k: timed_calls(raw.fetch, k),
                        }, [servers[0], redis_pid], n, rounds))
                else:
                    rows["peer_redis"] = "skipped: redis-server is not installed"

            compile_bytecode(env)
            cli = wall_times({
                "python -c pass": [PY, "-c", "pass"],
                "import stigmer.client": [PY, "-c", "import stigmer.client"],
                "stigmer-broker status": [PY, "-m", "stigmer.broker", "status"],
            }, cli_runs, env)
            rows["cli_ms"] = cli
            rows["import_client_adds_ms"] = cli["import stigmer.client"] - cli["python -c pass"]
            rows["ratio_import_client_vs_python"] = (cli["import stigmer.client"]
                                                     / cli["python -c pass"])
            rows["ratio_status_vs_python"] = cli["stigmer-broker status"] / cli["python -c pass"]
            rows["client_import_loads"] = heavy_modules_loaded(env)

            # `run` masking: the same `cat` of a large file, masked and --no-masking, with a
            # context of ten distinct secrets (each masked in all its encoded forms)
            with Client(small_sock) as c:
                mask_token = c.create_context("masking", runtime=variables(
                    {}, masking_secrets()), ttl_s=3600, token_ttl_s=3600).token
            run_env = {**env, "STIGMER_EXECUTION_TOKEN": mask_token}
            size = (1 << 30) if not args.smoke else (8 << 20)
            big_file = tmp / "big.txt"
            write_text_file(big_file, size)
            run = [PY, "-m", "stigmer.broker", "run"]
            masked = pipe_throughputs({
                "floor_cat": ["cat", str(big_file)],
                "masked": [*run, "--", "cat", str(big_file)],
                "no_masking": [*run, "--no-masking", "--", "cat", str(big_file)],
            }, size, 3 if not args.smoke else 1, run_env)
            rows["run_masking_mib_per_s"] = masked
            rows["ratio_run_masked_vs_unmasked_throughput"] = (masked["masked"]
                                                               / masked["no_masking"])
            rows["ratio_run_masked_vs_cat_throughput"] = masked["masked"] / masked["floor_cat"]

            # `mcp proxy`: a "server" that is `cat` of MCP replies, behind the proxy with a
            # context holding secrets (every message parsed and masked) and one without
            replies = tmp / "replies.jsonl"
            reply_size = (128 << 20) if not args.smoke else (4 << 20)
            write_mcp_replies(replies, reply_size)
            servers_file = tmp / "servers.json"
            servers_file.write_text(json.dumps({"mcpServers": {"cat": {
                "command": "cat", "args": [str(replies)]}}}))
            with Client(small_sock) as c:
                no_secrets = c.create_context("mcp-plain", runtime=variables(
                    context_variables()[0], {}), ttl_s=3600, token_ttl_s=3600).token
            proxy = [PY, "-m", "stigmer.broker", "mcp", "proxy", "--server", "cat",
                     "--config", str(servers_file)]
            mcp = pipe_throughputs({
                "floor_cat": ["cat", str(replies)],
                "masked": proxy,
                "unmasked": proxy,
            }, reply_size, 3 if not args.smoke else 1, run_env,
                envs={"unmasked": {**env, "STIGMER_EXECUTION_TOKEN": no_secrets}})
            rows["mcp_proxy_mib_per_s"] = mcp
            rows["ratio_mcp_proxy_masked_vs_unmasked_throughput"] = (mcp["masked"]
                                                                     / mcp["unmasked"])
            rows["ratio_mcp_proxy_masked_vs_cat_throughput"] = mcp["masked"] / mcp["floor_cat"]
            rows["run_start_ms"] = wall_times({
                "python -c pass": [PY, "-c", "pass"],  # the divisor, in the same rounds
                "masked": [*run, "--", "true"],
                "no_masking": [*run, "--no-masking", "--", "true"],
            }, cli_runs, run_env)
            rows["ratio_run_start_vs_python"] = (rows["run_start_ms"]["masked"]
                                                 / rows["run_start_ms"]["python -c pass"])
        rows["fleet"] = fleet_rows(tmp, broker, smoke=args.smoke)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


def _under(limit: float) -> Callable[[float], bool]:
    return lambda value: value < limit


#: (row, what it divides by what and its target, the check; None: reported only), the
#: order of the README's table: first what a runner sees, then each side alone
TARGETS: list[tuple[str, str, Callable[[float], bool] | None]] = [
    ("ratio_fetch_p50_vs_floor_raw_client",
     "fetch through stigmer.client / the strict floor through a raw client", None),
    ("ratio_fetch_p50_vs_floor_raw_client_pinned", "the same, pinned to one CPU", None),
    ("client_share_of_fetch_p50_us", "the library's share: fetch, library - raw client (us)",
     _at_most(5.0)),
    ("client_share_of_fetch_p50_us_pinned", "the same, pinned (us); <= 5", _at_most(5.0)),
    ("client_share_of_floor_p50_us", "the library's share of the floor's reply (us)",
     _at_most(5.0)),
    ("client_share_of_floor_p50_us_pinned", "the same, pinned (us); <= 5", _at_most(5.0)),
    ("ratio_fetch_raw_client_p50_vs_floor_raw_client",
     "the server alone: fetch / floor, both through a raw client; <= 2", _at_most(2.0)),
    ("ratio_fetch_raw_client_p50_vs_floor_raw_client_pinned", "the same, pinned; <= 2",
     _at_most(2.0)),
    ("ratio_fetch_p50_vs_floor",
     "fetch / floor, both through stigmer.client (the divisor holds our library); <= 2",
     _at_most(2.0)),
    ("ratio_fetch_p50_vs_floor_pinned", "the same, pinned; <= 2", _at_most(2.0)),
    ("ratio_fetch_p50_vs_redis", "fetch through stigmer.client / redis GET, raw RESP; <= 3",
     _at_most(3.0)),
    ("ratio_fetch_p50_vs_redis_pinned", "the same, pinned; <= 3", _at_most(3.0)),
    ("ratio_fetch_raw_client_p50_vs_redis", "fetch / redis GET, both raw clients", None),
    ("ratio_fetch_raw_client_p50_vs_redis_pinned", "the same, pinned", None),
    ("ratio_fetch_raw_client_p50_vs_ssh_agent",
     "fetch / ssh-agent identities, both raw clients; < 1", _under(1.0)),
    ("ratio_fetch_raw_client_p50_vs_ssh_agent_pinned", "the same, pinned; < 1", _under(1.0)),
    ("ratio_fetch_p50_vs_ssh_agent", "fetch through stigmer.client / ssh-agent, raw", None),
    ("ratio_fetch_p50_vs_ssh_agent_pinned", "the same, pinned", None),
    ("ratio_fetch_throughput_vs_floor", "16 client processes: fetches/s / floor's; >= 0.8",
     _at_least(0.8)),
    ("ratio_fetch_10k_vs_10_p50", "fetch p50, 10,000 / 10 live contexts; <= 1.1",
     _at_most(1.1)),
    ("ratio_fetch_max_uses_vs_unlimited_p50",
     "fetch p50, bounded / unbounded token (a durable write per use)", None),
    ("ratio_fetch_identity_vs_token_p50", "fetch p50, by execution id / by token; <= 1.2",
     _at_most(1.2)),
    ("ratio_fetch_metrics_on_vs_off_p50",
     "fetch p50, the same daemon with --metrics / without (noisy: read across runs)",
     _at_most(1.1)),
    ("ratio_fetch_metrics_on_vs_off_p50_pinned", "the same, pinned to one CPU",
     _at_most(1.1)),
    ("ratio_create_8_clients_vs_1", "context create, 8 clients / 1 client; >= 4",
     _at_least(4.0)),
    ("create_1_client_per_s", "context create, 1 client (per s); >= 1,000", _at_least(1000.0)),
    ("ratio_import_client_vs_python", "import stigmer.client / python -c pass; <= 2.5",
     _at_most(2.5)),
    ("ratio_run_start_vs_python", "run -- true (masked) / python -c pass; <= 3",
     _at_most(3.0)),
    ("ratio_status_vs_python", "stigmer-broker status / python -c pass", None),
    ("ratio_run_masked_vs_unmasked_throughput", "run -- cat, masked / unmasked MiB/s; >= 0.5",
     _at_least(0.5)),
    ("ratio_run_masked_vs_cat_throughput", "run -- cat masked / cat alone through a pipe",
     None),
    ("ratio_mcp_proxy_masked_vs_unmasked_throughput",
     "mcp proxy, masked / unmasked (every message parsed)", None),
    ("ratio_mcp_proxy_masked_vs_cat_throughput", "mcp proxy masked / cat alone", None),
]


def print_table(rows: dict[str, Any]) -> None:
    def line(name: str, s: dict[str, float]) -> None:
        print(f"  {name:<22} p50 {s['p50_us']:8.1f} us   p99 {s['p99_us']:8.1f} us   "
              f"{s['throughput_per_s']:9.0f}/s   (n={s['count']})")

    print("fetch, one client (blocking Client, alternating rounds):")
    for name, s in rows["one_client"].items():
        line(name, s)
    if rows.get("one_client_pinned"):
        print("the same, the client and every server pinned to one CPU:")
        for name, s in rows["one_client_pinned"].items():
            line(name, s)
    c = rows["concurrent"]
    print(f"fetch, {c['clients']} client processes: floor {c['floor_per_s']:.0f}/s, "
          f"broker {c['fetch_per_s']:.0f}/s")
    for peer in ("peer_redis", "peer_redis_pinned", "peer_ssh_agent", "peer_ssh_agent_pinned"):
        if isinstance(rows.get(peer), dict):
            print(f"{peer} (same run, alternating):")
            for name, s in rows[peer].items():
                line(name, s)
        else:
            print(f"{peer}: {rows.get(peer)}")
    print(f"create: {rows['create_contexts_per_s']:.0f} contexts/s (sealed, durable commit); "
          + ", ".join(f"{k} {v:.0f}/s" for k, v in rows["create_concurrency_per_s"].items()))
    print("CLI wall time (median ms): " + ", ".join(f"{k} {v:.1f}"
                                                    for k, v in rows["cli_ms"].items()))
    print("run, cat of a large file (MiB/s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in rows["run_masking_mib_per_s"].items())
        + "; run -- true (median ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in rows["run_start_ms"].items()))
    print("mcp proxy, MCP replies through a pipe (MiB/s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in rows["mcp_proxy_mib_per_s"].items()))
    print("figures against their targets (each over its own divisor, from this run):")
    for key, what, target in TARGETS:
        if key not in rows:
            continue
        value = rows[key]
        shown = f"{value:8.1f}" if key.endswith(("_us", "_per_s")) else f"{value:8.2f}"
        verdict = "report" if target is None else ("met" if target(value) else "MISSED")
        print(f"  {key:<56} {shown}  {verdict:<6}  {what}")
    print(f"  import stigmer.client adds {rows['import_client_adds_ms']:6.1f} ms to python")
    print(f"  heavy modules loaded by import stigmer.client: "
          f"{rows['client_import_loads'] or 'none'}")
    for key in ("daemon_rss_kib_10_contexts", "daemon_rss_kib_10k_contexts", "daemon_rss_kib"):
        if key in rows:
            print(f"  {key:<34} {rows[key] / 1024:6.1f} MiB")


if __name__ == "__main__":
    main()
