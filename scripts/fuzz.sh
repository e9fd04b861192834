#!/usr/bin/env bash
# Fuzzes the sans-IO protocol pieces and the config reader with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh --smoke        each target for a few seconds; fails on any crash (test suite)
#   scripts/fuzz.sh [SECONDS]      a campaign of SECONDS per target (default 300), then a
#                                  table of executions per target from libFuzzer's final stats
#
# Targets (fuzz/fuzz_targets/): command, reply, data, session, config, proxy_header, milter, hook. Seed
# inputs are written into fuzz/corpus/<target>/ on every run; the corpus grows there and
# crashing inputs land in fuzz/artifacts/<target>/ (both ignored by git). Reproduce a crash with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a -s none <target> <file>     (in fuzz/)
#
# Toolchain: cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer, the sanitizer-
# coverage LLVM passes, --cfg fuzzing) and cargo. Only a stable toolchain is installed here,
# so RUSTC_BOOTSTRAP=1 lets that stable compiler accept them. It is set for the fuzz build
# alone; the project itself is built without it.
#
# Build options, identical for every cargo-fuzz call so the build is reused:
#   -O -a      optimised, with debug assertions and overflow checks (overflow panics count)
#   -s none    no AddressSanitizer: the crate forbids unsafe code, so there is no memory
#              error for it to find, and without it builds and runs are several times faster
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fuzz_dir=$root/fuzz

seconds=300
for arg in "$@"; do
    case $arg in
        --smoke) seconds=8 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *[!0-9]*|'') echo "usage: $0 [--smoke] [SECONDS_PER_TARGET]" >&2; exit 2 ;;
        *) seconds=$arg ;;
    esac
done

targets=(command reply data session config proxy_header milter hook)
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
# The instrumented build of every dependency takes minutes: keep it outside the checkout
# (CI works in a fresh clone each time) so that later runs on the same machine reuse it.
target_dir=${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/proxsmtpd/fuzz-target}
mkdir -p "$target_dir"
build_flags=(-O -a -s none --target-dir "$target_dir")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --version '~0.13' --locked --quiet
fi

# Seed inputs: small valid SMTP sessions, replies, messages and configs. Inputs of the
# reply and data targets start with 8 bytes that seed their chunking.
seed() { # target name printf-format
    mkdir -p "$fuzz_dir/corpus/$1"
    # shellcheck disable=SC2059  # the seed is written as a printf format, for its escapes
    printf "$3" >"$fuzz_dir/corpus/$1/seed-$2"
}
write_seeds() {
    seed command mail 'MAIL FROM:<alice@example.org> SIZE=1024 BODY=8BITMIME\r\n'
    seed command null 'mail from: <>\r\n'
    seed command rcpt 'RCPT TO:bob@example.net NOTIFY=NEVER\r\n'
    seed command xforward 'XFORWARD NAME=mx.example ADDR=[10.0.0.1] HELO=spike.example\r\n'
    seed command ehlo '  EHLO client.example\r\n'

    seed reply ehlo 'chunks01250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 STARTTLS\r\n'
    seed reply mixed 'chunks02220 ready\r\n354 go ahead\n421-closing\r\n421 bye\r\ngarbage\n25\n'

    seed data message 'chunks01Subject: test\r\nFrom: a@example.org\r\n\r\nbody\r\n..dotted\r\n.\r\nQUIT\r\n'
    seed data smuggle 'chunks02a\n.\nb\r\n.\rc\r.\r\nMAIL FROM:<x@y>\r\n.\r\n'
    seed data bare 'chunks03line\rother\n\r\n.\r\n'

    # Session records: byte 1 policy, byte 2 TLS; then C client, S upstream, E client
    # close, L over-long client line, G greeting read by the proxy.
    seed session plain '\x00\x00S220 mx.example ESMTP\r\nCEHLO client.example\r\nS250-mx.example\r\nS250-PIPELINING\r\nS250 SIZE 1000\r\nCMAIL FROM:<a@example.org>\r\nS250 ok\r\nCRCPT TO:<b@example.net>\r\nS250 ok\r\nCDATA\r\nCQUIT\r\nS221 bye\r\n'
    seed session pipelined '\x10\x00S220 mx\r\nCHELO c\r\nCMAIL FROM:<>\r\nCRCPT TO:<b@x>\r\nCRSET\r\nS250 mx\r\nS250 ok\r\nS550 no\r\nS250 reset\r\nCXFORWARD ADDR=10.0.0.1 HELO=h\r\nS250 ok\r\nL\nE\n'
    seed session xclient '\x18\x00S220 mx\r\nCEHLO c\r\nS250-mx\r\nS250 XCLIENT ADDR NAME\r\nCMAIL FROM:<a@b>\r\nS220 xclient ok\r\nS250 mx again\r\nS250 ok\r\n'
    seed session starttls '\x00\x03G\nCEHLO c\r\nS250-mx\r\nS250 SIZE 10\r\nCMAIL FROM:<a@b>\r\nCSTARTTLS\r\nCRCPT TO:<injected@x>\r\nCEHLO c\r\nS250 reset\r\nS250 mx\r\nCAUTH PLAIN\r\nS334 \r\nCdGVzdAB0ZXN0AHRlc3Q=\r\nS235 ok\r\n'
    seed session reject '\x02\x00S220 mx\r\nCEHLO c\r\nS250 mx\r\nCMAIL FROM:<a@b>\r\nCDATA\r\nCBDAT 10 LAST\r\nCXCLIENT ADDR=1.2.3.4\r\nS250 ok\r\n'

    seed config example '# proxsmtpd.conf\nListen: 127.0.0.1:10025\nOutAddress: 10026\nFilterCommand: cat\nFilterType: pipe\nFilterTimeout: 30\nHeader: X-Filtered: yes\nMaxConnections: 64\nTimeOut: 180\nKeepAlives: 0\nTempDirectory: /tmp\nXClient: off\nSkip: authenticated\n'
    seed config modern 'AdminListen: 127.0.0.1:9090\r\nContainer: yes\r\nDrainTimeout: 30\r\nProxyProtocol: on\r\nProxyProtocolTrusted: 10.0.0.0/8, 2001:db8::/32\r\nLogFormat: json\r\nOutAddress: [::1]:25\r\nTransparentProxy: full\r\nUpstreamTls: opportunistic\r\n'
    seed config bad 'FilterType: reject\nFilterReject: 550 no\nMaxConnections: 99999\n'

    # PROXY headers as balancers send them, followed by the client's first bytes.
    seed proxy_header v1-tcp4 'PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\nEHLO c\r\n'
    seed proxy_header v1-tcp6 'PROXY TCP6 2001:db8::1 2001:db8::25 40000 587\r\n'
    seed proxy_header v1-unknown 'PROXY UNKNOWN\r\n'
    seed proxy_header v2-tcp4 '\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x0a\xc6\x33\x64\x01\xdc\x04\x00\x19EHLO c\r\n'
    seed proxy_header v2-tcp6-tlv '\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x2a\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x25\x9c\x40\x02\x4b\x04\x00\x03abc'
    seed proxy_header v2-local '\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00'

    # Filter replies, after 8 seed bytes: a negotiation answer (used when the seed does not
    # make one up), then answers to the stages the target begins.
    seed milter plain 'milter01\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\0\x04\0\0\0\0\x01c\0\0\0\x01c\0\0\0\x01p\0\0\0\x01c\0\0\0\x01s\0\0\0\x0chX-Spam\0yes\0\0\0\0\x01a'
    seed milter reject 'milter02\0\0\0\x01c\0\0\0\x01c\0\0\0\x0fy550 5.7.1 no\0\0\0\0\x01t\0\0\0\x01r\0\0\0\x05bbody\0\0\0\x01d'
    # Hook answers (after 8 bytes that seed the chunking of the same bytes as message text).
    seed hook reject 'hook0001{"action":"reject","response":{"status":451,"enhancedStatus":"4.7.1","message":"later\\r\\n250 ok","disconnect":true}}'
    seed hook modify 'hook0002{"action":"accept","modifications":[{"type":"changeFrom","value":"a@b","parameters":{"SIZE":"1","X":null}},{"type":"replaceContents","value":"a\\nb\\r"},{"type":"deleteHeader","index":1,"name":"X"}]}'
    seed hook text 'hook0003Subject: caf\xc3\xa9\r\n\r\n\xff\xfe "quoted" \\ \x01\x1f\xe2\x82'
    seed milter symlist 'milter03\0\0\0\x21O\0\0\0\x06\0\0\x01\xff\0\0\0\0\0\0\0\0j {client_addr}\0\0\0\0\x01c'
}

dict_for() {
    case $1 in
        config) echo "$fuzz_dir/dict/config.dict" ;;
        proxy_header) echo "$fuzz_dir/dict/proxy.dict" ;;
        milter) echo "$fuzz_dir/dict/milter.dict" ;;
        *) echo "$fuzz_dir/dict/smtp.dict" ;;
    esac
}

cd "$fuzz_dir"
start=$SECONDS
cargo fuzz build "${build_flags[@]}"
echo "fuzz build: $((SECONDS - start)) s"
write_seeds

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=()
for target in "${targets[@]}"; do
    log=$logs/$target.log
    echo "=== fuzz $target: ${seconds} s"
    if cargo fuzz run "${build_flags[@]}" "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -dict="$(dict_for "$target")" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        failed+=("$target")
        # The panic, the input and how to reproduce it.
        grep -E -A12 "panicked at|ERROR: libFuzzer|deadly signal|Test unit written" "$log" | head -60 || true
        tail -20 "$log"
    fi
    final_stat() { awk -v k="stat::$1:" '$1 == k { print $2 }' "$log" | tail -1; }
    printf '%s %s %s %s %s %s\n' "$target" "$(final_stat number_of_executed_units)" \
        "$(final_stat average_exec_per_sec)" "$(find "corpus/$target" -type f | wc -l)" \
        "$(final_stat peak_rss_mb)" "$result" >>"$logs/table"
done

echo
printf '%-8s %14s %10s %8s %8s  %s\n' target executions exec/s corpus rss_mb result
while read -r t execs rate corpus rss result; do
    printf '%-8s %14s %10s %8s %8s  %s\n' "$t" "${execs:--}" "${rate:--}" "$corpus" "${rss:--}" "$result"
done <"$logs/table"
echo "total: $((SECONDS - start)) s, ${seconds} s per target"

if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
