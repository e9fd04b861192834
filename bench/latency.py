#!/usr/bin/env python3
"""Per-transaction latency of an SMTP server, one message at a time.

smtp-source reports only a total time, so this client measures each message
on its own: connect, greeting, EHLO, MAIL, RCPT, DATA, body, QUIT, close,
with one new connection per message (as smtp-source does without -d).

Two times are kept per message:
  session  connect .. reply to QUIT   (what a sending MTA waits for)
  txn      MAIL FROM .. reply to "."  (the mail transaction alone)

Prints one line of key=value pairs; exits 1 if any message failed.
"""
import argparse
import math
import socket
import sys
import time


class SmtpError(Exception):
    pass


def read_reply(rfile, want):
    """Reads a whole (possibly multi-line) reply; checks its code."""
    while True:
        line = rfile.readline(8192)
        if not line:
            raise SmtpError(f"connection closed while waiting for {want}")
        if len(line) < 4 or line[3:4] != b"-":
            break
    if not line.startswith(want):
        raise SmtpError(f"expected {want.decode()}, got {line[:80]!r}")


def make_body(size):
    """A plain message of about `size` bytes of body, CRLF lines of 78 chars."""
    head = (
        b"From: <sender@bench.example>\r\n"
        b"To: <rcpt@bench.example>\r\n"
        b"Subject: latency probe\r\n"
        b"\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest > 2:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + body + b".\r\n"


def one_message(host, port, data, timeout):
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        read_reply(rfile, b"220")
        sock.sendall(b"EHLO latency.bench.example\r\n")
        read_reply(rfile, b"250")
        t_mail = time.perf_counter()
        sock.sendall(b"MAIL FROM:<sender@bench.example>\r\n")
        read_reply(rfile, b"250")
        sock.sendall(b"RCPT TO:<rcpt@bench.example>\r\n")
        read_reply(rfile, b"250")
        sock.sendall(b"DATA\r\n")
        read_reply(rfile, b"354")
        sock.sendall(data)
        read_reply(rfile, b"250")
        t_end = time.perf_counter()
        sock.sendall(b"QUIT\r\n")
        read_reply(rfile, b"221")
        rfile.close()
    t1 = time.perf_counter()
    return t1 - t0, t_end - t_mail


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    rank = math.ceil(p / 100.0 * len(sorted_vals))
    return sorted_vals[max(0, min(len(sorted_vals), rank) - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=1024, help="body bytes")
    ap.add_argument("--count", type=int, default=1000, help="at most this many messages")
    ap.add_argument("--secs", type=float, default=2.0, help="stop after this long")
    ap.add_argument("--warmup", type=int, default=3, help="messages not counted")
    ap.add_argument("--timeout", type=float, default=10.0, help="per socket operation")
    args = ap.parse_args()

    data = make_body(args.size)
    sessions, txns, errors, first_error = [], [], 0, ""
    deadline = time.monotonic() + args.secs
    done = 0
    while done < args.count + args.warmup and time.monotonic() < deadline:
        try:
            s, t = one_message(args.host, args.port, data, args.timeout)
            if done >= args.warmup:
                sessions.append(s)
                txns.append(t)
        except (OSError, SmtpError) as exc:
            errors += 1
            first_error = first_error or str(exc).replace(" ", "_")[:80]
            if errors >= 5:
                break
        done += 1

    sessions.sort()
    txns.sort()
    ms = 1000.0
    print(
        f"lat_n={len(sessions)} lat_errors={errors}"
        f" lat_p50_ms={percentile(sessions, 50) * ms:.3f}"
        f" lat_p99_ms={percentile(sessions, 99) * ms:.3f}"
        f" txn_p50_ms={percentile(txns, 50) * ms:.3f}"
        f" txn_p99_ms={percentile(txns, 99) * ms:.3f}"
        + (f" lat_error={first_error}" if first_error else "")
    )
    return 1 if errors or not sessions else 0


if __name__ == "__main__":
    sys.exit(main())
