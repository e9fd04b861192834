#!/usr/bin/env python3
"""Per-step latency of SMTP sessions against several servers, interleaved.

For each port, opens one session after another (connect, greeting, EHLO,
MAIL, RCPT, DATA, body, QUIT, close) and times every step; the ports take
turns session by session, so that load on the machine falls on all of them
alike. Prints the median of each step per port, in microseconds.

Used to see where a proxy's added latency goes: give it the sink's port and
the port of a proxy in front of that sink, e.g.

    smtp-sink -c 127.0.0.1:10026 1000 &
    target/release/proxsmtpd -d 1 -f proxy.conf &     # Listen 10025, OutAddress 10026
    python3 bench/steps.py 10026 10025
"""
import argparse
import socket
import statistics
import time

from latency import make_body, read_reply

STEPS = ["connect+greeting", "EHLO", "MAIL", "RCPT", "DATA", "body", "QUIT", "close"]


def one_session(host, port, body, timeout):
    marks = [time.perf_counter()]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")

        def step(data, want):
            if data:
                sock.sendall(data)
            read_reply(rfile, want)
            marks.append(time.perf_counter())

        step(None, b"220")
        step(b"EHLO steps.bench.example\r\n", b"250")
        step(b"MAIL FROM:<sender@bench.example>\r\n", b"250")
        step(b"RCPT TO:<rcpt@bench.example>\r\n", b"250")
        step(b"DATA\r\n", b"354")
        step(body, b"250")
        step(b"QUIT\r\n", b"221")
        rfile.close()
    marks.append(time.perf_counter())
    return [(b - a) * 1e6 for a, b in zip(marks, marks[1:], strict=False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ports", type=int, nargs="+", help="one port per server to compare")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--sessions", type=int, default=1000, help="per port")
    ap.add_argument("--warmup", type=int, default=20, help="sessions not counted, per port")
    ap.add_argument("--size", type=int, default=1024, help="body bytes")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    body = make_body(args.size)
    times = {p: [] for p in args.ports}
    for i in range(args.warmup + args.sessions):
        for p in args.ports:
            t = one_session(args.host, p, body, args.timeout)
            if i >= args.warmup:
                times[p].append(t)
    print("port\t" + "\t".join(STEPS) + "\tsum")
    for p in args.ports:
        med = [statistics.median(s[k] for s in times[p]) for k in range(len(STEPS))]
        print(f"{p}\t" + "\t".join(f"{m:.0f}" for m in med) + f"\t{sum(med):.0f}")


if __name__ == "__main__":
    main()
