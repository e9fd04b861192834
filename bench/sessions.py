#!/usr/bin/env python3
"""Holds many idle SMTP sessions open at once and measures what they cost.

Each session connects, reads the greeting, says HELO and waits. Once all are
open, the proxy's resident memory (VmRSS) is compared with its value before
the first connection, and the number of established TCP connections towards
the upstream port is counted (each session must have its own). With --probes
N, N more clients then connect one after the other while all those sessions
are still open, and the time from connect to the greeting's last line is
taken for each (each probe says QUIT before the next connects). Then every
session says QUIT and must get 221.

Prints one line of key=value pairs; exits 1 on any error.
"""
import argparse
import asyncio
import sys
import time


def proc_kb(pid, key):
    """A 'kB' field of /proc/PID/status, or 0 when there is no such process."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def established_to(port):
    """Established IPv4 TCP sockets whose remote end is 127.0.0.1:port."""
    want = f"0100007F:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[2] == want and fields[3] == "01":
                count += 1
    return count


class Session:
    def __init__(self):
        self.reader = None
        self.writer = None


async def expect(reader, code, timeout):
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError(f"closed while waiting for {code}")
        if len(line) < 4 or line[3:4] != b"-":
            break
    if not line.startswith(code):
        raise ConnectionError(f"expected {code.decode()}, got {line[:60]!r}")


async def open_one(host, port, gate, timeout):
    async with gate:
        s = Session()
        s.reader, s.writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), timeout)
        await expect(s.reader, b"220", timeout)
        s.writer.write(b"HELO sessions.bench.example\r\n")
        await expect(s.reader, b"250", timeout)
        return s


async def close_one(s, gate, timeout):
    async with gate:
        try:
            s.writer.write(b"QUIT\r\n")
            await expect(s.reader, b"221", timeout)
        finally:
            s.writer.close()


async def probe_greetings(args):
    """Connect .. greeting times in ms of args.probes clients, one after the other."""
    times = []
    for _ in range(args.probes):
        t0 = time.monotonic()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args.host, args.port), args.timeout)
        try:
            await expect(reader, b"220", args.timeout)
            times.append((time.monotonic() - t0) * 1000)
            writer.write(b"QUIT\r\n")
            await expect(reader, b"221", args.timeout)
        finally:
            writer.close()
    return times


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def first_error(results):
    for r in results:
        if isinstance(r, BaseException):
            return (type(r).__name__ + ":" + str(r)).replace(" ", "_")[:80]
    return ""


async def run(args):
    out = {}
    rss_idle = proc_kb(args.pid, "VmRSS")
    t0 = time.monotonic()
    gate = asyncio.Semaphore(args.connect_conc)
    opened = await asyncio.gather(
        *(open_one(args.host, args.port, gate, args.timeout) for _ in range(args.count)),
        return_exceptions=True)
    good = [s for s in opened if isinstance(s, Session)]
    out["open_secs"] = f"{time.monotonic() - t0:.2f}"
    await asyncio.sleep(args.settle)
    rss_held = proc_kb(args.pid, "VmRSS")
    upstream = established_to(args.upstream_port)
    out["sessions"] = len(good)
    out["upstream_conns"] = upstream
    out["rss_idle_kb"] = rss_idle
    out["rss_held_kb"] = rss_held
    if args.pid and rss_held and good:
        out["kb_per_session"] = f"{(rss_held - rss_idle) / len(good):.1f}"
    else:
        out["kb_per_session"] = "nan"  # no proxy, or it is gone
    probe_error = ""
    if args.probes:
        try:
            times = await probe_greetings(args)
            out["greet_p50_ms"] = f"{percentile(times, 50):.3f}"
            out["greet_p99_ms"] = f"{percentile(times, 99):.3f}"
            out["greet_max_ms"] = f"{max(times):.3f}"
        except (OSError, ConnectionError, asyncio.TimeoutError) as e:
            probe_error = ("probe:" + type(e).__name__ + ":" + str(e)).replace(" ", "_")[:80]

    closed = await asyncio.gather(*(close_one(s, gate, args.timeout) for s in good),
                                  return_exceptions=True)
    open_errors = len(opened) - len(good)
    close_errors = sum(1 for r in closed if isinstance(r, BaseException))
    errors = open_errors + close_errors + (1 if upstream < len(good) else 0)
    errors += 1 if probe_error else 0
    out["errors"] = errors
    err = first_error(opened) or first_error(closed) or probe_error
    if not err and upstream < len(good):
        err = f"only_{upstream}_upstream_connections"
    if err:
        out["error"] = err
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 1 if errors else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="where sessions connect")
    ap.add_argument("--upstream-port", type=int, required=True,
                    help="the sink's port: connections to it are counted")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--pid", type=int, default=0, help="proxy whose RSS is measured")
    ap.add_argument("--connect-conc", type=int, default=4,
                    help="sessions being opened at once (the original's listen backlog is 5)")
    ap.add_argument("--probes", type=int, default=0,
                    help="new clients timed to their greeting while all sessions are open")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds before measuring")
    ap.add_argument("--timeout", type=float, default=15.0, help="per SMTP step")
    ap.add_argument("--deadline", type=float, default=180.0, help="whole run")
    args = ap.parse_args()
    try:
        return asyncio.run(asyncio.wait_for(run(args), args.deadline))
    except (asyncio.TimeoutError, TimeoutError):
        print(f"sessions=0 errors=1 error=deadline_{args.deadline:.0f}s_exceeded")
        return 1


if __name__ == "__main__":
    sys.exit(main())
