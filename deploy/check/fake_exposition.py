#!/usr/bin/env python3
"""Write a proxsmtpd-like Prometheus exposition that grows over time, for checking the
dashboards and alert rules before the real /metrics endpoint exists.

Every metric name and label value of the operational contract is present; counters and
histograms grow on each tick as if mail were flowing (mostly accepted, some rejected,
dropped and temp-failed, a few filter timeouts and upstream errors). The file is rewritten
atomically; serve its directory with `python3 -m http.server` and scrape /metrics.

Usage: fake_exposition.py DIR SECONDS [TICK]
"""
import os
import random
import sys
import time

VERDICTS = {"accepted": 8.0, "rejected": 2.0, "dropped": 0.5, "tempfailed": 0.5, "local_error": 0.1}
STAGES = ("connect", "greeting", "command", "data", "final")
CLASSES = {"2xx": 40.0, "3xx": 10.0, "4xx": 1.0, "5xx": 2.0}
FILTER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v):
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name):
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


def main():
    out_dir, seconds = sys.argv[1], float(sys.argv[2])
    tick = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    rnd = random.Random(25)
    msgs = {v: 0 for v in VERDICTS}
    replies = {c: 0 for c in CLASSES}
    upstream = {s: 0 for s in STAGES}
    c = {"conn": 0, "refused": 0, "timeouts": 0, "spawn": 0, "reload_ok": 0, "reload_fail": 0}
    # every TLS series exists from the start, as in the binary
    tls = {(side, v): 0 for side in ("client", "upstream") for v in ("TLSv1.2", "TLSv1.3")}
    tls_fail = {"client": 0, "upstream": 0}
    cert_reloads = {"success": 0, "failure": 0}
    filt, size = Histogram(FILTER_BUCKETS), Histogram(SIZE_BUCKETS)
    reply = {s: Histogram(FILTER_BUCKETS) for s in ("greeting", "command", "data", "final")}
    start = time.time()
    end = time.time() + seconds
    while True:
        for v, rate in VERDICTS.items():
            n = int(rate * tick * 2 * rnd.random() + 0.5)
            msgs[v] += n
            for _ in range(n):
                filt.observe(rnd.lognormvariate(-3, 1))
                size.observe(rnd.lognormvariate(9, 1.5))
        for k, rate in CLASSES.items():
            replies[k] += int(rate * tick * 2 * rnd.random() + 0.5)
        new_conn = int(10 * tick * 2 * rnd.random() + 1)
        c["conn"] += new_conn
        tls[("client", "TLSv1.3")] += int(new_conn * 0.6)
        tls[("client", "TLSv1.2")] += int(new_conn * 0.2 * rnd.random())
        tls[("upstream", "TLSv1.3")] += int(new_conn * 0.6)
        if rnd.random() < 0.2:
            tls_fail["client"] += 1
        if rnd.random() < 0.05:
            cert_reloads["success"] += 1
        if rnd.random() < 0.3:
            c["timeouts"] += 1
            upstream[rnd.choice(STAGES)] += 1
        if rnd.random() < 0.1:
            c["refused"] += 1
        active = rnd.randint(1, 12)
        for stage, h in reply.items():
            for _ in range(int(5 * tick * 2 * rnd.random() + 1)):
                h.observe(rnd.lognormvariate(-4, 1))
        cpu = (time.time() - start) * 0.05
        lines = [
            "# HELP proxsmtpd_build_info Build information.", "# TYPE proxsmtpd_build_info gauge",
            'proxsmtpd_build_info{version="0.1.0",revision="0000000"} 1',
            "# HELP proxsmtpd_max_connections MaxConnections.", "# TYPE proxsmtpd_max_connections gauge",
            "proxsmtpd_max_connections 64",
            "# HELP proxsmtpd_config_last_reload_successful 1 after a successful reload or start.",
            "# TYPE proxsmtpd_config_last_reload_successful gauge", "proxsmtpd_config_last_reload_successful 1",
            "# HELP proxsmtpd_config_last_reload_success_timestamp_seconds Time of the last good load.",
            "# TYPE proxsmtpd_config_last_reload_success_timestamp_seconds gauge",
            f"proxsmtpd_config_last_reload_success_timestamp_seconds {start:.3f}",
            "# HELP proxsmtpd_tls_certificate_expiry_timestamp_seconds Expiry of the served certificate.",
            "# TYPE proxsmtpd_tls_certificate_expiry_timestamp_seconds gauge",
            f"proxsmtpd_tls_certificate_expiry_timestamp_seconds {start + 60 * 86400:.0f}",
            "# HELP proxsmtpd_upstream_reply_duration_seconds Upstream reply latency by stage.",
            "# TYPE proxsmtpd_upstream_reply_duration_seconds histogram",
            *[l.replace("{", f'{{stage="{st}",', 1) if "{" in l else l.replace(" ", f'{{stage="{st}"}} ', 1)
              for st, h in reply.items() for l in h.lines("proxsmtpd_upstream_reply_duration_seconds")],
            "# HELP process_cpu_seconds_total CPU time.", "# TYPE process_cpu_seconds_total counter",
            f"process_cpu_seconds_total {cpu:.3f}",
            "# HELP process_resident_memory_bytes RSS.", "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {20e6 + rnd.random() * 1e6:.0f}",
            "# HELP process_open_fds Open fds.", "# TYPE process_open_fds gauge", f"process_open_fds {20 + active}",
            "# HELP process_max_fds Max fds.", "# TYPE process_max_fds gauge", "process_max_fds 1048576",
            "# HELP proxsmtpd_messages_total Messages by verdict.", "# TYPE proxsmtpd_messages_total counter",
            *[f'proxsmtpd_messages_total{{verdict="{v}"}} {n}' for v, n in msgs.items()],
            "# HELP proxsmtpd_filter_duration_seconds Filter run time.", "# TYPE proxsmtpd_filter_duration_seconds histogram",
            *filt.lines("proxsmtpd_filter_duration_seconds"),
            "# HELP proxsmtpd_message_size_bytes Message size.", "# TYPE proxsmtpd_message_size_bytes histogram",
            *size.lines("proxsmtpd_message_size_bytes"),
            "# HELP proxsmtpd_connections_total Client connections.", "# TYPE proxsmtpd_connections_total counter",
            f"proxsmtpd_connections_total {c['conn']}",
            "# HELP proxsmtpd_connections_active Open client connections.", "# TYPE proxsmtpd_connections_active gauge",
            f"proxsmtpd_connections_active {active}",
            "# HELP proxsmtpd_connections_refused_total Connections refused at MaxConnections.",
            "# TYPE proxsmtpd_connections_refused_total counter", f"proxsmtpd_connections_refused_total {c['refused']}",
            "# HELP proxsmtpd_upstream_errors_total Upstream errors by stage.", "# TYPE proxsmtpd_upstream_errors_total counter",
            *[f'proxsmtpd_upstream_errors_total{{stage="{s}"}} {n}' for s, n in upstream.items()],
            "# HELP proxsmtpd_filter_timeouts_total Filter timeouts.", "# TYPE proxsmtpd_filter_timeouts_total counter",
            f"proxsmtpd_filter_timeouts_total {c['timeouts']}",
            "# HELP proxsmtpd_filter_spawn_failures_total Filter spawn failures.",
            "# TYPE proxsmtpd_filter_spawn_failures_total counter", f"proxsmtpd_filter_spawn_failures_total {c['spawn']}",
            "# HELP proxsmtpd_replies_total Replies to clients by class.", "# TYPE proxsmtpd_replies_total counter",
            *[f'proxsmtpd_replies_total{{class="{k}"}} {n}' for k, n in replies.items()],
            "# HELP proxsmtpd_config_reloads_total Configuration reloads.", "# TYPE proxsmtpd_config_reloads_total counter",
            f'proxsmtpd_config_reloads_total{{result="success"}} {c["reload_ok"]}',
            f'proxsmtpd_config_reloads_total{{result="failure"}} {c["reload_fail"]}',
            "# HELP proxsmtpd_draining 1 while draining.", "# TYPE proxsmtpd_draining gauge", "proxsmtpd_draining 0",
            "# HELP proxsmtpd_tls_sessions_total TLS handshakes completed.", "# TYPE proxsmtpd_tls_sessions_total counter",
            *[f'proxsmtpd_tls_sessions_total{{side="{s}",version="{v}"}} {n}' for (s, v), n in tls.items()],
            "# HELP proxsmtpd_tls_handshake_failures_total TLS handshakes that failed.",
            "# TYPE proxsmtpd_tls_handshake_failures_total counter",
            *[f'proxsmtpd_tls_handshake_failures_total{{side="{s}"}} {n}' for s, n in tls_fail.items()],
            "# HELP proxsmtpd_tls_certificate_reloads_total Loads of a changed TLS certificate.",
            "# TYPE proxsmtpd_tls_certificate_reloads_total counter",
            *[f'proxsmtpd_tls_certificate_reloads_total{{result="{r}"}} {n}' for r, n in cert_reloads.items()],
        ]
        tmp = os.path.join(out_dir, ".metrics.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, os.path.join(out_dir, "metrics"))
        if time.time() >= end:
            return 0
        time.sleep(tick)


if __name__ == "__main__":
    sys.exit(main())
