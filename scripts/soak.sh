#!/usr/bin/env bash
# Load soak: many messages at a fixed concurrency through a filter that randomly accepts,
# rejects, drops and fails, with an exact account at the end:
#
#   messages at the upstream + rejections + drops + temporary failures == messages sent
#
# and the proxy's resident memory sampled every few seconds (first/last/max reported).
#
# Usage: scripts/soak.sh [--messages N] [--concurrency C] [--binary PATH]
#                        [--rss-interval SECONDS] [--keep]
# Defaults: 100000 messages at concurrency 64, target/release/proxsmtpd (built if missing).
# Needs python3 (the counting upstream and the load generator). Exit status: 0 when the
# account is exact and every message got a final reply, 1 otherwise, 77 when python3 is
# missing. The last line of output is machine-readable:
#   SOAK-RESULT sent=.. upstream=.. accepted=.. rejected=.. dropped=.. tempfailed=..
#               no_reply=.. seconds=.. rate=.. rss_first_kib=.. rss_warm_kib=..
#               rss_last_kib=.. rss_max_kib=.. rss_samples=.. leftover=.. alive=..
set -euo pipefail
cd "$(dirname "$0")/.."

messages=100000
concurrency=64
binary=""
rss_interval=2
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) messages=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --rss-interval) rss_interval=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "soak: unknown option $1" >&2; exit 2 ;;
    esac
done

if ! command -v python3 >/dev/null 2>&1; then
    echo "soak: python3 not found; skipped" >&2
    exit 77
fi
if [ -z "$binary" ]; then
    binary=target/release/proxsmtpd
    [ -x "$binary" ] || cargo build --release
fi
binary=$(realpath "$binary")

work=$(mktemp -d "${TMPDIR:-/tmp}/proxsmtpd-soak.XXXXXX")
pids=()
cleanup() {
    # Only the processes this script started, by pid.
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "$keep" = 1 ]; then
        echo "soak: kept $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# --- The filter: 70% accept, 10% reject, 10% silent drop, 5% crash, 5% tempfail. ------
mkdir -p "$work/spool"
cat > "$work/filter.sh" <<'EOF'
#!/bin/bash
r=$((RANDOM % 100))
if [ $r -lt 70 ]; then
    exec cat
elif [ $r -lt 80 ]; then
    echo "550 5.7.1 soak: rejected" >&2; exit 1
elif [ $r -lt 90 ]; then
    echo "250 2.0.0 soak: dropped" >&2; exit 1
elif [ $r -lt 95 ]; then
    kill -9 $$
else
    echo "451 4.3.0 soak: try again later" >&2; exit 75
fi
EOF
chmod 755 "$work/filter.sh"

# --- The counting upstream and the load generator. --------------------------------------
cat > "$work/soak.py" <<'EOF'
"""Counting SMTP sink (`sink PORTFILE`) and load generator (`load ...`) for soak.sh."""
import asyncio
import sys
import time


async def sink(port_file):
    count = 0

    async def serve(reader, writer):
        nonlocal count
        writer.write(b"220 sink.soak ESMTP\r\n")
        in_data = False
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        count += 1
                        writer.write(b"250 2.0.0 Ok: queued as S%d\r\n" % count)
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    in_data = True
                    writer.write(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                elif line.upper().startswith(b"XCOUNT"):
                    writer.write(b"250 %d\r\n" % count)
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    with open(port_file, "w") as f:
        f.write(str(port))
    async with server:
        await server.serve_forever()


class Tally:
    def __init__(self, total):
        self.total = total
        self.next = 0
        self.counts = dict(accepted=0, rejected=0, dropped=0, tempfailed=0, no_reply=0)

    def claim(self):
        if self.next >= self.total:
            return None
        self.next += 1
        return self.next


async def reply(reader):
    """One complete reply: (code, first line)."""
    first = None
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if first is None:
            first = line.decode("latin-1").rstrip()
        if line[3:4] != b"-":
            return int(line[:3]), first


def classify(tally, code, text):
    if 200 <= code < 300:
        tally.counts["dropped" if "dropped" in text else "accepted"] += 1
    elif 500 <= code < 600:
        tally.counts["rejected"] += 1
    else:
        tally.counts["tempfailed"] += 1


async def worker(port, tally, per_connection):
    reader = writer = None
    sent_here = 0
    while True:
        n = tally.claim()
        if n is None:
            break
        # 250: the session is ready for a transaction.
        code, text = 250, ""
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
                code, text = await reply(reader)
                if code == 220:
                    writer.write(b"EHLO load.soak\r\n")
                    code, text = await reply(reader)
                sent_here = 0
            steps = (
                (b"MAIL FROM:<load%d@soak.test>\r\n" % n, 250),
                (b"RCPT TO:<sink@soak.test>\r\n", 250),
                (b"DATA\r\n", 354),
                ((b"From: <load%d@soak.test>\r\nTo: <sink@soak.test>\r\nSubject: soak %d\r\n"
                  b"Message-ID: <%d@soak.test>\r\n\r\n" % (n, n, n)) + b"soak line\r\n" * 20
                 + b".\r\n", None),
            )
            if code == 250:
                for data, want in steps:
                    writer.write(data)
                    code, text = await reply(reader)
                    if want is not None and code != want:
                        break
        except (ConnectionError, OSError, ValueError) as e:
            tally.counts["no_reply"] += 1
            print("soak: message %d got no final reply: %s" % (n, e), file=sys.stderr)
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        # The final reply, or the refusal that ended the message early.
        classify(tally, code, text)
        sent_here += 1
        if code == 421 or sent_here >= per_connection:
            # A 421 ends the session; otherwise connections are recycled now and then.
            try:
                writer.write(b"QUIT\r\n")
                await writer.drain()
            except OSError:
                pass
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.write(b"QUIT\r\n")
        writer.close()


async def count_at(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"XCOUNT\r\n")
    _, text = await reply(reader)
    writer.close()
    return int(text.split()[1])


async def load(proxy_port, sink_port, total, concurrency):
    tally = Tally(total)
    started = time.monotonic()

    async def progress():
        while True:
            await asyncio.sleep(10)
            done = sum(tally.counts.values())
            print("soak: %d/%d messages, %.0f/s" % (done, total, done / (time.monotonic() - started)),
                  file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress())
    # Sessions of different lengths: some connections are recycled often, some rarely.
    await asyncio.gather(*(worker(proxy_port, tally, 50 + 37 * (i % 7)) for i in range(concurrency)))
    reporter.cancel()
    seconds = time.monotonic() - started
    upstream = await count_at(sink_port)
    c = tally.counts
    print("sent=%d upstream=%d accepted=%d rejected=%d dropped=%d tempfailed=%d no_reply=%d "
          "seconds=%.1f rate=%.0f" % (total, upstream, c["accepted"], c["rejected"], c["dropped"],
                                      c["tempfailed"], c["no_reply"], seconds, total / seconds))


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        asyncio.run(sink(sys.argv[2]))
    else:
        asyncio.run(load(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
EOF

python3 "$work/soak.py" sink "$work/sink.port" &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/sink.port" ] && break; sleep 0.1; done
sink_port=$(cat "$work/sink.port")

proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/proxsmtpd.conf" <<EOF
Listen: 127.0.0.1:$proxy_port
OutAddress: 127.0.0.1:$sink_port
FilterCommand: $work/filter.sh
FilterType: pipe
FilterTimeout: 60
TimeOut: 120
MaxConnections: $((concurrency * 2 + 16))
TempDirectory: $work/spool
EOF
"$binary" -d 1 -f "$work/proxsmtpd.conf" > "$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $proxy_port)).close()" 2>/dev/null && break
    sleep 0.1
done

# RSS of the proxy every few seconds.
(
    while kill -0 "$proxy_pid" 2>/dev/null; do
        awk '/^VmRSS:/ {print $2}' "/proc/$proxy_pid/status" 2>/dev/null || true
        sleep "$rss_interval"
    done
) > "$work/rss" &
pids+=($!)

echo "soak: $messages messages at concurrency $concurrency through $binary" >&2
result=$(python3 "$work/soak.py" load "$proxy_port" "$sink_port" "$messages" "$concurrency")
# One last sample at the end, whatever the interval.
awk '/^VmRSS:/ {print $2}' "/proc/$proxy_pid/status" >> "$work/rss" 2>/dev/null || true
alive=1
kill -0 "$proxy_pid" 2>/dev/null || alive=0

# The first sample is the idle proxy; the one at 10% of the run shows it under load, so
# "last" against "warm" is the growth over 90% of the run.
rss=$(awk 'NF { s[++n] = $1; if ($1 > max) max = $1 }
           END { w = int(n / 10); if (w < 1) w = 1
                 printf "rss_first_kib=%d rss_warm_kib=%d rss_last_kib=%d rss_max_kib=%d rss_samples=%d", s[1], s[w], s[n], max, n }' "$work/rss")
leftover=$(find "$work/spool" -type f | wc -l)

declare -A v
for kv in $result $rss; do v[${kv%%=*}]=${kv#*=}; done
sum=$(( v[upstream] + v[rejected] + v[dropped] + v[tempfailed] ))
ok=1
echo "soak: messages sent ${v[sent]}, in ${v[seconds]} s (${v[rate]} messages/s)" >&2
echo "soak: upstream ${v[upstream]} + rejected ${v[rejected]} + dropped ${v[dropped]} + temp failures ${v[tempfailed]} = $sum" >&2
if [ "$sum" -ne "${v[sent]}" ]; then echo "soak: ACCOUNT MISMATCH: $sum != ${v[sent]}" >&2; ok=0; fi
if [ "${v[upstream]}" -ne "${v[accepted]}" ]; then
    echo "soak: MISMATCH: the upstream has ${v[upstream]}, clients were told ${v[accepted]} accepted" >&2; ok=0
fi
if [ "${v[no_reply]}" -ne 0 ]; then echo "soak: ${v[no_reply]} messages got no final reply" >&2; ok=0; fi
if [ "$alive" -ne 1 ]; then echo "soak: the proxy died" >&2; ok=0; fi
if [ "$leftover" -ne 0 ]; then echo "soak: $leftover files left in TempDirectory" >&2; ok=0; fi
echo "soak: proxy RSS first ${v[rss_first_kib]} KiB (idle), at 10% ${v[rss_warm_kib]} KiB, last ${v[rss_last_kib]} KiB, max ${v[rss_max_kib]} KiB (${v[rss_samples]} samples every ${rss_interval} s)" >&2
echo "SOAK-RESULT $result $rss leftover=$leftover alive=$alive"
[ "$ok" = 1 ]
