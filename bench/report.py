#!/usr/bin/env python3
"""Turns the per-run lines of bench/run.sh into medians, ratios and tables.

Input: one line per run of key=value pairs (round, scenario, setup, ...),
or a PREFIX-runs.tsv that an earlier report wrote (to render it again).
Writes PREFIX-runs.tsv (every run), PREFIX.tsv (medians per scenario and
setup), PREFIX-ratios.tsv (ratios and targets) and PREFIX.md (the tables,
also printed on stdout).

A ratio is the median over rounds of the ratio within each round: the runs
of one round are next to each other in time, so load from elsewhere on the
machine that comes and goes over minutes cancels out. Added latency is
likewise the median over rounds of (p50 through the proxy - p50 direct).
Against haproxy, each round compares ours with the faster (more msgs/s) of
haproxy1 and haproxy2 in that round.

Exit status 1 when a run of ours, of the byte relay, of haproxy, of the direct path or of the
spawn driver had an error; the original's errors are reported only.
"""
import argparse
import math
import os
import statistics
import sys

# Columns of the runs and medians files, in order.
COLUMNS = [
    "scenario", "setup", "msgs", "conc", "secs", "mps",
    "cpu_self_s", "cpu_child_s", "cpu_us_per_msg", "child_us_per_msg", "rss_kb",
    "lat_n", "lat_p50_ms", "lat_p99_ms", "txn_p50_ms", "txn_p99_ms",
    "sessions", "upstream_conns", "rss_idle_kb", "rss_held_kb", "kb_per_session",
    "open_secs", "greet_p50_ms", "greet_p99_ms", "greet_max_ms", "proxy_died", "overflows", "ideal_mps", "errors", "error",
]
SETUP_ORDER = ["original", "ours", "ours2", "nofilter", "relay", "haproxy1", "haproxy2", "direct", "spawn", "rspamc"]
FATAL_SETUPS = {"ours", "ours2", "nofilter", "relay", "haproxy1", "haproxy2", "direct", "spawn", "rspamc"}
HAPROXIES = ("haproxy1", "haproxy2")

# name, scenario, how it is measured, limit, "min" or "max"
TARGETS = [
    ("no filter 1 KB c1: ours/direct msgs/s", "nofilter_c1_1k", "direct_ratio", 0.5, "min"),
    ("no filter 1 KB c32: ours/direct msgs/s", "nofilter_c32_1k", "direct_ratio", 0.5, "min"),
    ("cat 4 KB c32: ours/spawn limit", "cat_c32_4k", "spawn_ratio", 0.7, "min"),
    ("20 MB through cat: proxy peak RSS (KB)", "big_cat_20m", "ours_rss_kb", 16384, "max"),
    ("20 MB through cat: proxy CPU (s)", "big_cat_20m", "ours_cpu_self_s", 0.1, "max"),
    ("2,000 sessions: proxy RSS per session (KB)", "sessions_2000", "ours_kb_per_session", 64, "max"),
    ("2,000 sessions: errors", "sessions_2000", "ours_errors", 0, "max"),
    ("10,000 sessions: proxy RSS per session (KB)", "sessions_10000", "ours_kb_per_session", 16, "max"),
    ("10,000 sessions: errors (each with its upstream connection)", "sessions_10000", "ours_errors", 0, "max"),
    ("10,000 sessions open: a new client's greeting, p99 of 100 (ms)", "sessions_10000", "ours_greet_p99_ms", 10, "max"),
    ("no filter c1: added p50 transaction latency, MAIL .. final reply (ms)", "nofilter_c1_1k", "added_txn_p50_ms", 0.5, "max"),
    # The target is on the transaction (the figure). The whole session is shown
    # beside what a byte relay that knows nothing of SMTP adds in the same run: below that
    # floor no relay of each exchange can go on this machine (BENCHMARKS.md, "Where the
    # latency goes"), so it is a figure to read, not a limit to meet.
    ("no filter c1: added p50 latency, whole session, connect .. 221 (ms)", "nofilter_c1_1k", "added_p50_ms", None, "info"),
    ("no filter c1: the same for the byte relay (ms)", "nofilter_c1_1k", "added_p50_ms_relay", None, "info"),
    # Against haproxy in TCP mode, the faster of nbthread 1 and 2 in each round (issue 17).
    ("no filter 1 KB c1: ours/haproxy msgs/s", "nofilter_c1_1k", "haproxy_ratio", 1.0, "min"),
    ("no filter 1 KB c32: ours/haproxy msgs/s", "nofilter_c32_1k", "haproxy_ratio", 1.0, "min"),
    ("no filter 1 KB c1: proxy CPU per message ours/haproxy", "nofilter_c1_1k", "haproxy_cpu", 1.0, "max"),
    ("no filter 1 KB c32: proxy CPU per message ours/haproxy", "nofilter_c32_1k", "haproxy_cpu", 1.0, "max"),
    ("no filter c1: session p50 ours - haproxy (ms)", "nofilter_c1_1k", "haproxy_p50_ms", 0.05, "max"),
    ("no filter c1: session p99 ours - haproxy (ms)", "nofilter_c1_1k", "haproxy_p99_ms", 0.05, "max"),
    ("rspamd 4 KB c1: ours+rspamd / rspamd alone (rspamc) msgs/s", "rspamd_c1_4k", "rspamc_ratio", 0.8, "min"),
    ("rspamd 4 KB c32: ours+rspamd / rspamd alone (rspamc) msgs/s", "rspamd_c32_4k", "rspamc_ratio", 0.8, "min"),
    ("hook answering in 50 ms, c32: ours / ideal (32 / 0.05 s) msgs/s", "hook_sleep50_c32", "ideal_ratio", 0.9, "min"),
    ("hook answering in 25 to 75 ms, c32: ours / ideal (32 / 0.05 s) msgs/s", "hook_jitter50_c32", "ideal_ratio", 0.9, "min"),
    # What this machine allows any proxy whose filter takes as long: the byte relay holding
    # each message's end for the hook's wait, same rounds (run.sh, setup relay).
    ("50 ms, c32: byte relay holding each message / ideal msgs/s", "hook_sleep50_c32", "relay_ideal_ratio", None, "info"),
    ("25 to 75 ms, c32: byte relay holding each message / ideal msgs/s", "hook_jitter50_c32", "relay_ideal_ratio", None, "info"),
    ("hook answering in 50 ms, c32: ours / byte relay holding each message msgs/s", "hook_sleep50_c32", "relay_ratio", None, "info"),
    ("hook answering in 25 to 75 ms, c32: ours / byte relay holding each message msgs/s", "hook_jitter50_c32", "relay_ratio", None, "info"),
]


def parse_line(line):
    rec = {}
    for item in line.split():
        if "=" in item:
            k, v = item.split("=", 1)
            rec[k] = v
    return rec


def num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def median_record(runs):
    out = {"runs": len(runs)}
    for col in COLUMNS:
        if col in ("scenario", "setup"):
            out[col] = runs[0].get(col, "")
        elif col == "errors":
            out[col] = sum(int(num(r.get(col)) or 0) for r in runs)
        elif col == "error":
            out[col] = next((r[col] for r in runs if r.get(col)), "")
        else:
            vals = [x for x in (num(r.get(col)) for r in runs) if x is not None]
            out[col] = statistics.median(vals) if vals else None
    return out


def fmt(x, digits=None):
    if x is None or x == "":
        return "-"
    if isinstance(x, str):
        return x
    if digits is not None:
        return f"{x:.{digits}f}"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired(rounds, sc, a, b, col, how):
    """Median over rounds of how(a's col, b's col) within the same round."""
    vals = []
    for (rsc, _), setups in rounds.items():
        if rsc != sc or a not in setups or b not in setups:
            continue
        x, y = num(setups[a].get(col)), num(setups[b].get(col))
        if x is not None and y is not None:
            v = how(x, y)
            if v is not None:
                vals.append(v)
    return statistics.median(vals) if vals else None


def diff(a, b):
    return a - b


def with_best_haproxy(rounds):
    """rounds, where each round that ran haproxy also has a setup "haproxy":
    the run of haproxy1 or haproxy2 with more msgs/s in that round (for the
    sessions scenario, which has no rate, the one with less RSS per session)."""
    out = {}
    for key, setups in rounds.items():
        runs = [setups[h] for h in HAPROXIES if h in setups and not num(setups[h].get("errors"))]
        setups = dict(setups)
        if runs:
            if any(num(r.get("mps")) is not None for r in runs):
                best = max(runs, key=lambda r: num(r.get("mps")) or 0.0)
            else:
                best = min(runs, key=lambda r: num(r.get("kb_per_session")) or math.inf)
            setups["haproxy"] = best
        out[key] = setups
    return out


# A target's `how` -> the ratio column of by_sc it reads; any other `how` is "ours_" and a
# median column of ours.
TARGET_COLUMNS = {
    "direct_ratio": "ours_direct_mps",
    "spawn_ratio": "ours_spawn_mps",
    "rspamc_ratio": "ours_rspamc_mps",
    "ideal_ratio": "ours_ideal_mps",
    "relay_ideal_ratio": "relay_ideal_mps",
    "relay_ratio": "ours_relay_mps",
    "haproxy_ratio": "ours_haproxy_mps",
    "haproxy_cpu": "ours_haproxy_cpu",
    "haproxy_p50_ms": "ours_minus_haproxy_p50_ms",
    "haproxy_p99_ms": "ours_minus_haproxy_p99_ms",
    "added_p50_ms": "added_p50_ms_ours",
    "added_txn_p50_ms": "added_txn_p50_ms_ours",
    "added_p50_ms_relay": "added_p50_ms_relay",
}


def md_table(md, header, rows):
    """Appends a markdown table after a blank line: the first column left-aligned, the
    others right-aligned (numbers)."""
    md.append("")
    md.append("| " + " | ".join(header) + " |")
    md.append("|---|" + "---:|" * (len(header) - 1))
    for cells in rows:
        md.append("| " + " | ".join(str(c) for c in cells) + " |")


def write_tsv(path, header, rows):
    with open(path, "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join("" if row.get(h) is None else str(row.get(h)) for h in header) + "\n")


def per_run(runs, sc, setup, a, b):
    """Median over the runs of one setup of a / b within the same run."""
    vals = []
    for r in runs:
        if r.get("scenario") != sc or r.get("setup") != setup:
            continue
        v = ratio(num(r.get(a)), num(r.get(b)))
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def notes_for(m):
    notes = []
    if m["scenario"].startswith("big_") and m.get("secs") is not None:
        notes.append(f"one message: {fmt(m['secs'])} s wall")
        if m.get("cpu_self_s") is not None and m["setup"] != "direct":
            notes.append(f"proxy CPU {fmt(m['cpu_self_s'])} s")
    if m.get("sessions") is not None and m["scenario"].startswith("sessions"):
        if m.get("proxy_died"):
            notes.append(f"the proxy died after {fmt(m['sessions'], 0)} sessions")
        else:
            notes.append(f"{fmt(m['sessions'], 0)} held, {fmt(m.get('upstream_conns'), 0)} upstream")
        if m["setup"] != "direct":
            notes.append(f"{fmt(m.get('kb_per_session'))} KB/session")
        if m.get("open_secs") is not None:
            notes.append(f"opened in {fmt(m['open_secs'])} s")
        if m.get("greet_p50_ms") is not None:
            notes.append(f"new client greeted in {fmt(m['greet_p50_ms'])} ms p50, "
                         f"{fmt(m.get('greet_p99_ms'))} p99, {fmt(m.get('greet_max_ms'))} max")
    if m.get("overflows"):
        notes.append(f"listen overflows {fmt(m['overflows'], 0)}")
    if m.get("error"):
        notes.append("error: " + m["error"])
    return "; ".join(notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="file of key=value run lines")
    ap.add_argument("--meta", help="file of key=value lines about the machine")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default="latest")
    args = ap.parse_args()

    runs = []
    with open(args.runs) as f:
        header = None
        for line in f:
            if not line.strip():
                continue
            if line.startswith("round\t"):  # a PREFIX-runs.tsv written earlier
                header = line.rstrip("\n").split("\t")
            elif header:
                runs.append({k: v for k, v in zip(header, line.rstrip("\n").split("\t"), strict=False) if v != ""})
            else:
                runs.append(parse_line(line))
    meta = {}
    if args.meta and os.path.exists(args.meta):
        with open(args.meta) as f:
            for line in f:
                if "=" in line:
                    k, v = line.rstrip("\n").split("=", 1)
                    meta[k] = v

    scenarios = []
    groups = {}
    for r in runs:
        sc, setup = r.get("scenario", "?"), r.get("setup", "?")
        if sc not in scenarios:
            scenarios.append(sc)
        groups.setdefault((sc, setup), []).append(r)
    med = {key: median_record(rs) for key, rs in groups.items()}
    rounds = {}
    for r in runs:
        rounds.setdefault((r.get("scenario"), r.get("round")), {})[r.get("setup")] = r
    rounds = with_best_haproxy(rounds)

    def get(sc, setup, col):
        m = med.get((sc, setup))
        return None if m is None else m.get(col)

    os.makedirs(args.out, exist_ok=True)
    write_tsv(os.path.join(args.out, f"{args.prefix}-runs.tsv"), ["round"] + COLUMNS, runs)
    ordered = [med[(sc, s)] for sc in scenarios for s in SETUP_ORDER if (sc, s) in med]
    write_tsv(os.path.join(args.out, f"{args.prefix}.tsv"), COLUMNS[:2] + ["runs"] + COLUMNS[2:], ordered)

    # Ratios, one row per scenario.
    ratio_rows = []
    for sc in scenarios:
        row = {
            "scenario": sc,
            "ours_direct_mps": paired(rounds, sc, "ours", "direct", "mps", ratio),
            "ours_original_mps": paired(rounds, sc, "ours", "original", "mps", ratio),
            "ours_spawn_mps": paired(rounds, sc, "ours", "spawn", "mps", ratio),
            "ours_original_cpu": paired(rounds, sc, "ours", "original", "cpu_us_per_msg", ratio),
            "ours_original_rss": paired(rounds, sc, "ours", "original", "rss_kb", ratio),
            "added_p50_ms_ours": paired(rounds, sc, "ours", "direct", "lat_p50_ms", diff),
            "added_txn_p50_ms_ours": paired(rounds, sc, "ours", "direct", "txn_p50_ms", diff),
            "added_p50_ms_original": paired(rounds, sc, "original", "direct", "lat_p50_ms", diff),
            "added_p50_ms_relay": paired(rounds, sc, "relay", "direct", "lat_p50_ms", diff),
            "added_txn_p50_ms_relay": paired(rounds, sc, "relay", "direct", "txn_p50_ms", diff),
            "ours_haproxy_mps": paired(rounds, sc, "ours", "haproxy", "mps", ratio),
            "ours_haproxy_cpu": paired(rounds, sc, "ours", "haproxy", "cpu_us_per_msg", ratio),
            "ours_haproxy_rss": paired(rounds, sc, "ours", "haproxy", "rss_kb", ratio),
            "ours_relay_mps": paired(rounds, sc, "ours", "relay", "mps", ratio),
            "added_p50_ms_haproxy": paired(rounds, sc, "haproxy", "direct", "lat_p50_ms", diff),
            "ours_minus_haproxy_p50_ms": paired(rounds, sc, "ours", "haproxy", "lat_p50_ms", diff),
            "ours_minus_haproxy_p99_ms": paired(rounds, sc, "ours", "haproxy", "lat_p99_ms", diff),
            # Milter scenarios: ours with the milter against ours with no filter, same round.
            "milter_nofilter_mps": paired(rounds, sc, "ours", "nofilter", "mps", ratio),
            "milter_nofilter_cpu": paired(rounds, sc, "ours", "nofilter", "cpu_us_per_msg", ratio),
            "milter_added_cpu_us": paired(rounds, sc, "ours", "nofilter", "cpu_us_per_msg", diff),
            "milter_added_p50_ms": paired(rounds, sc, "ours", "nofilter", "lat_p50_ms", diff),
            # rspamd scenarios: ours in front of rspamd against rspamd scanning alone.
            "ours_rspamc_mps": paired(rounds, sc, "ours", "rspamc", "mps", ratio),
            # A hook that answers after a fixed delay: ours against CONC / delay.
            "ours_ideal_mps": per_run(runs, sc, "ours", "mps", "ideal_mps"),
            "relay_ideal_mps": per_run(runs, sc, "relay", "mps", "ideal_mps"),
            # A second build of ours (setup ours2), against ours and haproxy, same round.
            "ours2_ours_mps": paired(rounds, sc, "ours2", "ours", "mps", ratio),
            "ours2_ours_cpu": paired(rounds, sc, "ours2", "ours", "cpu_us_per_msg", ratio),
            "ours2_haproxy_mps": paired(rounds, sc, "ours2", "haproxy", "mps", ratio),
            "ours2_haproxy_cpu": paired(rounds, sc, "ours2", "haproxy", "cpu_us_per_msg", ratio),
            "ours2_minus_haproxy_p50_ms": paired(rounds, sc, "ours2", "haproxy", "lat_p50_ms", diff),
            "ours2_minus_haproxy_p99_ms": paired(rounds, sc, "ours2", "haproxy", "lat_p99_ms", diff),
        }
        if sc.startswith("sessions"):
            row["ours_original_rss"] = paired(rounds, sc, "ours", "original", "kb_per_session", ratio)
            row["ours_haproxy_rss"] = paired(rounds, sc, "ours", "haproxy", "kb_per_session", ratio)
        ratio_rows.append(row)
    by_sc = {r["scenario"]: r for r in ratio_rows}

    target_rows = []
    for name, sc, how, limit, kind in TARGETS:
        if sc not in by_sc or (sc, "ours") not in med:
            continue
        if how in TARGET_COLUMNS:
            value = by_sc[sc][TARGET_COLUMNS[how]]
        else:
            value = get(sc, "ours", how[len("ours_"):])
        if kind == "info":
            if value is not None:
                target_rows.append({"target": name, "scenario": sc, "value": value,
                                    "limit": "-", "met": "-"})
            continue
        met = None if value is None else (value >= limit if kind == "min" else value <= limit)
        target_rows.append({"target": name, "scenario": sc, "value": value,
                            "limit": (">= " if kind == "min" else "<= ") + fmt(limit),
                            "met": {None: "n/a", True: "yes", False: "NO"}[met]})

    ratio_cols = ["scenario", "ours_direct_mps", "ours_original_mps", "ours_spawn_mps",
                  "ours_original_cpu", "ours_original_rss", "added_p50_ms_ours",
                  "added_txn_p50_ms_ours", "added_p50_ms_original", "added_p50_ms_relay",
                  "added_txn_p50_ms_relay", "ours_haproxy_mps", "ours_haproxy_cpu",
                  "ours_haproxy_rss", "ours_relay_mps", "added_p50_ms_haproxy",
                  "ours_minus_haproxy_p50_ms", "ours_minus_haproxy_p99_ms",
                  "milter_nofilter_mps", "milter_nofilter_cpu", "milter_added_cpu_us",
                  "milter_added_p50_ms", "ours_rspamc_mps", "ours_ideal_mps",
                  "ours2_ours_mps", "ours2_ours_cpu", "ours2_haproxy_mps", "ours2_haproxy_cpu",
                  "ours2_minus_haproxy_p50_ms", "ours2_minus_haproxy_p99_ms"]
    with open(os.path.join(args.out, f"{args.prefix}-ratios.tsv"), "w") as f:
        f.write("\t".join(ratio_cols) + "\n")
        for r in ratio_rows:
            f.write("\t".join("" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                              for c in ratio_cols) + "\n")
        f.write("\n" + "\t".join(["target", "scenario", "value", "limit", "met"]) + "\n")
        for t in target_rows:
            f.write("\t".join(["" if t[c] is None else str(t[c]) for c in ("target", "scenario", "value", "limit", "met")]) + "\n")

    # Markdown.
    md = []
    nruns = max((m["runs"] for m in med.values()), default=0)
    if meta.get("profile"):
        how = f"a {meta['profile']} profiling run: the figures are not speeds"
    elif meta.get("smoke") == "1":
        how = "a smoke run (tiny counts): the figures are not speeds"
    else:
        how = (f"median of {nruns} interleaved runs per setup, "
               f"about {meta.get('secs_per_run', '?')} s each")
    md.append(f"Measured {meta.get('date', '?')} on {meta.get('cpus', '?')} CPUs, kernel {meta.get('kernel', '?')}; "
              f"load average {meta.get('load_start', '?')} at the start, {meta.get('load_end', '?')} at the end; "
              f"{how}; whole run {meta.get('wall_s', '?')} s. Tree {meta.get('tree', '?')}, "
              f"ours {meta.get('ours_sha256', '?')} (sha256 prefix); "
              f"postfix {meta.get('postfix', '?')}, proxsmtp {meta.get('proxsmtp', '?')}.")
    md.append("")
    md.append("| scenario | setup | msgs/s | proxy CPU µs/msg | filter CPU µs/msg | peak RSS KB | session p50 ms | session p99 ms | errors | notes |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in ordered:
        proxied = m["setup"] in ("original", "ours", "ours2", "nofilter", "relay") + HAPROXIES
        sessions = m["scenario"].startswith("sessions")
        md.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            m["scenario"], m["setup"],
            "-" if sessions else fmt(m["mps"]),
            fmt(m["cpu_us_per_msg"], 0) if proxied and not sessions else "-",
            fmt(m["child_us_per_msg"], 0) if (proxied or m["setup"] in ("spawn", "rspamc")) and not sessions
            else "-",
            fmt(m["rss_kb"], 0) if proxied else "-",
            fmt(m["lat_p50_ms"]), fmt(m["lat_p99_ms"]),
            m["errors"], notes_for(m)))
    # ours/haproxy: against the faster of haproxy1 and haproxy2 in each round. The milter
    # scenarios have their own table below.
    milter_rows = [r for r in ratio_rows if r["scenario"].startswith(("milter_", "rspamd_", "hook_"))]
    if len(milter_rows) < len(ratio_rows):
        md.append("")
        md.append("| scenario | ours/direct msgs/s | ours/original msgs/s | ours/haproxy msgs/s | ours/relay msgs/s | ours/spawn limit | CPU/msg ours/original | CPU/msg ours/haproxy | peak RSS ours/original | peak RSS ours/haproxy | added transaction p50 ms (ours) | added session p50 ms (ours) | added session p50 ms (byte relay) | added session p50 ms (haproxy) | added session p50 ms (original) |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in ratio_rows:
        if r in milter_rows:
            continue
        md.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["scenario"], fmt(r["ours_direct_mps"], 2), fmt(r["ours_original_mps"], 1),
            fmt(r["ours_haproxy_mps"], 2), fmt(r["ours_relay_mps"], 2),
            fmt(r["ours_spawn_mps"], 2), fmt(r["ours_original_cpu"], 2), fmt(r["ours_haproxy_cpu"], 2),
            fmt(r["ours_original_rss"], 2), fmt(r["ours_haproxy_rss"], 2),
            fmt(r["added_txn_p50_ms_ours"], 3), fmt(r["added_p50_ms_ours"], 3),
            fmt(r["added_p50_ms_relay"], 3), fmt(r["added_p50_ms_haproxy"], 3),
            fmt(r["added_p50_ms_original"], 3)))
    if milter_rows:
        # "no filter" is ours without filter or milter in the same round; the filter's CPU
        # (null milter or rspamd) is in the table above as filter CPU, not in the proxy's.
        md_table(md, ["scenario", "msgs/s: milter or hook / no filter",
                      "proxy CPU/msg: milter or hook / no filter",
                      "proxy CPU µs/msg added by the milter or hook",
                      "session p50 ms added by the milter or hook",
                      "msgs/s: ours+rspamd / rspamd alone (rspamc)",
                      "msgs/s: ours / ideal (slow hook)",
                      "msgs/s: byte relay holding as long / ideal",
                      "msgs/s: ours / byte relay holding as long"],
                 [[r["scenario"], fmt(r["milter_nofilter_mps"], 2), fmt(r["milter_nofilter_cpu"], 2),
                   fmt(r["milter_added_cpu_us"], 0), fmt(r["milter_added_p50_ms"], 3),
                   fmt(r["ours_rspamc_mps"], 2), fmt(r["ours_ideal_mps"], 2),
                   fmt(r["relay_ideal_mps"], 2),
                   fmt(r["ours_relay_mps"] if r["ours_ideal_mps"] is not None else None, 2)]
                  for r in milter_rows])
    ours2_rows = [r for r in ratio_rows if r["ours2_ours_mps"] is not None]
    if ours2_rows:
        md.append("")
        md.append(f"ours2: {meta.get('ours2', '?')} ({meta.get('ours2_sha256', '?')}); "
                  "ours - haproxy p50/p99 as in the first table's rounds.")
        md_table(md, ["scenario", "msgs/s ours2/ours", "CPU/msg ours2/ours", "msgs/s ours/haproxy",
                      "msgs/s ours2/haproxy", "CPU/msg ours/haproxy", "CPU/msg ours2/haproxy",
                      "p50 ms ours - haproxy", "p50 ms ours2 - haproxy",
                      "p99 ms ours - haproxy", "p99 ms ours2 - haproxy"],
                 [[r["scenario"], fmt(r["ours2_ours_mps"], 2), fmt(r["ours2_ours_cpu"], 2),
                   fmt(r["ours_haproxy_mps"], 2), fmt(r["ours2_haproxy_mps"], 2),
                   fmt(r["ours_haproxy_cpu"], 2), fmt(r["ours2_haproxy_cpu"], 2),
                   fmt(r["ours_minus_haproxy_p50_ms"], 3), fmt(r["ours2_minus_haproxy_p50_ms"], 3),
                   fmt(r["ours_minus_haproxy_p99_ms"], 3), fmt(r["ours2_minus_haproxy_p99_ms"], 3)]
                  for r in ours2_rows])
    if target_rows and meta.get("smoke") != "1" and not meta.get("profile"):
        md.append("")
        md.append("| target | measured | limit | met |")
        md.append("|---|---:|---:|---|")
        for t in target_rows:
            md.append(f"| {t['target']} | {fmt(t['value'])} | {t['limit']} | {t['met']} |")
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out, f"{args.prefix}.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)

    bad = [f"{m['scenario']}/{m['setup']}: {m['error'] or 'error'}" for m in ordered
           if m["errors"] and m["setup"] in FATAL_SETUPS]
    for b in bad:
        print(f"report: failed run: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
