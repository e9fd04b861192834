#!/usr/bin/env python3
"""The spawn limit: how fast this machine runs `sh -c cat` on a small message.

No SMTP at all: the same command a pipe filter runs per message (`/bin/sh -c
cat`, which execs /usr/bin/cat from the shell), started with posix_spawn with
its standard input a file of --size bytes and its standard output /dev/null,
keeping --conc of them running at once, for --secs seconds.

It bounds what any proxy that runs one such filter per message can reach at
the same concurrency. Prints one line of key=value pairs; exits 1 if a child
failed.
"""
import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conc", type=int, default=32)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--count", type=int, default=1_000_000, help="at most this many")
    ap.add_argument("--command", default="cat", help="given to /bin/sh -c")
    args = ap.parse_args()

    with tempfile.NamedTemporaryFile(prefix="spawn-msg.") as msg:
        line = b"x" * 76 + b"\r\n"
        msg.write((line * (args.size // len(line) + 1))[: args.size])
        msg.flush()
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, msg.name, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        ]
        argv = ["sh", "-c", args.command]
        env = dict(os.environ)

        c0 = os.times()
        t0 = time.perf_counter()
        deadline = t0 + args.secs
        running = started = done = failed = 0
        while True:
            while running < args.conc and started < args.count and time.perf_counter() < deadline:
                os.posix_spawn("/bin/sh", argv, env, file_actions=actions)
                running += 1
                started += 1
            if running == 0:
                break
            _, status = os.wait()
            running -= 1
            done += 1
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                failed += 1
        secs = time.perf_counter() - t0
        c1 = os.times()

    child_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    self_cpu = (c1.user - c0.user) + (c1.system - c0.system)
    print(
        f"msgs={done} conc={args.conc} secs={secs:.3f} mps={done / secs:.1f}"
        f" cpu_self_s={self_cpu:.3f} cpu_child_s={child_cpu:.3f}"
        f" child_us_per_msg={child_cpu * 1e6 / max(1, done):.1f}"
        f" errors={failed}"
    )
    return 1 if failed or not done else 0


if __name__ == "__main__":
    sys.exit(main())
