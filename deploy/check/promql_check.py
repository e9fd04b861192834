#!/usr/bin/env python3
"""Evaluate every dashboard query and alert rule through a running Prometheus.

For scripts/deploy-check.sh, after Prometheus has scraped a proxsmtpd under traffic.

Dashboards (Grafana JSON): every panel target, rows included. Grafana's variables are
replaced the way Grafana would: `label_values(selector, label)` query variables become the
regex alternation of the label values Prometheus has (`.*` when it has none, like "All"),
$__rate_interval / $__interval / $__range become fixed durations. Each expression is run as
an instant query at the end of the window and as a range query over the window; an error or
an empty result fails. Panel JSON is also checked for unique ids and a datasource on every
target.

Rules (Prometheus rule files): every expression must evaluate without error. An alert's
expression is empty whenever the alert is not firing, so its signal, the expression with the
comparisons against numbers removed (and absent(X) read as X), must be non-empty. Rules loaded into Prometheus
itself (rule_files) must report health "ok". Alert states are printed for information.

Usage: promql_check.py --url http://127.0.0.1:9090 --start UNIX --end UNIX
                       [--dashboard FILE]... [--rules FILE]... [--rate-interval 1m]
Prints PASS/FAIL lines and exits 1 if anything failed.
"""
import argparse
import json
import re
import sys
import urllib.parse
import urllib.request

# Series of other exporters a dashboard may show next to proxsmtpd's (kube-state-metrics: the
# container's memory limit). The Prometheus of this check scrapes only proxsmtpd, so a target
# made only of these may be empty here; a syntax or evaluation error still fails.
EXTERNAL = {"kube_pod_container_resource_limits"}
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class Prom:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, params):
        q = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=30) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:   # Prometheus answers 400/422 with a JSON body
            try:
                return json.load(e)
            except ValueError:
                return {"status": "error", "error": f"HTTP {e.code}"}
        except (OSError, ValueError) as e:
            return {"status": "error", "error": str(e)}

    def instant(self, expr, at):
        return self.get("/api/v1/query", {"query": expr, "time": at})

    def range(self, expr, start, end, step):
        return self.get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})


class Report:
    def __init__(self):
        self.passed = self.failed = 0

    def __call__(self, ok, what, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def unwrap_absent(expr):
    """absent(X) is empty whenever X exists, which is when the alert should not fire: its
    signal is X itself."""
    while True:
        i = expr.find("absent(")
        if i < 0 or (i > 0 and (expr[i - 1].isalnum() or expr[i - 1] == "_")):
            return expr
        depth, j = 0, i + len("absent")
        for j in range(i + len("absent"), len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[j], 0)
            if depth == 0:
                break
        expr = expr[:i] + expr[i + len("absent("):j] + expr[j + 1:]


def result_size(resp):
    data = resp.get("data") or {}
    res = data.get("result")
    if data.get("resultType") == "scalar":
        return 1
    return len(res) if isinstance(res, list) else 0


def panels_of(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])   # collapsed rows keep their panels inside


def substitute(expr, values, rate_interval):
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    expr = expr.replace("$__interval", "15s").replace("${__interval}", "15s").replace("$__range", "5m")
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${%s}" % name, values[name]).replace("[[%s]]" % name, values[name])
        expr = re.sub(r"\$%s\b" % re.escape(name), lambda _m, v=values[name]: v, expr)
    return expr


def promql_regex_escape(value):
    """A literal inside a regex inside a PromQL string, escaped as Grafana does (\\. for .)."""
    return re.sub(r"([.*+?^${}()|\[\]\\])", r"\\\\\1", value)


def resolve_variables(prom, dash, rate_interval, report, fname):
    """Values of the dashboard's query variables, in order (later ones may use earlier ones)."""
    values = {}
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", q)
        if not m:
            report(False, f"{fname} variable {var['name']}", f"unsupported query {q!r}")
            values[var["name"]] = ".*"
            continue
        selector = substitute(m.group(1), values, rate_interval)
        resp = prom.get(f"/api/v1/label/{m.group(2)}/values", {"match[]": selector})
        ok = resp.get("status") == "success"
        found = resp.get("data") or []
        report(ok, f"{fname} variable {var['name']}: {q}", f"{found}" if ok else resp.get("error", ""))
        values[var["name"]] = "|".join(promql_regex_escape(v) for v in found) if found else ".*"
    return values


def check_dashboard(prom, path, args, report):
    fname = path.rsplit("/", 1)[-1]
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    ids = [p.get("id") for p in panels_of(dash)]
    report(len(ids) == len(set(ids)) and None not in ids, f"{fname}: panel ids unique", f"{len(ids)} panels")
    known = set(prom.get("/api/v1/label/__name__/values", {}).get("data") or [])
    values = resolve_variables(prom, dash, args.rate_interval, report, fname)
    check_annotations(prom, path, dash, values, args, report)
    for panel in panels_of(dash):
        for t in panel.get("targets", []):
            what = f"{fname} panel {panel.get('id')} \"{panel.get('title')}\" {t.get('refId')}"
            if not (t.get("datasource") or panel.get("datasource")):
                report(False, what, "no datasource")
            expr = substitute(t.get("expr", ""), values, args.rate_interval)
            missing = sorted(set(re.findall(r"\b(proxsmtpd_\w+?)(?:_bucket|_sum|_count)?\b", expr)) - known
                             - {n[:-len(s)] for n in known for s in ("_bucket", "_sum", "_count") if n.endswith(s)})
            inst = prom.instant(expr, args.end)
            rng = prom.range(expr, args.start, args.end, args.step)
            errors = [r.get("error") for r in (inst, rng) if r.get("status") != "success"]
            if errors:
                report(False, what, f"error {errors[0]} in {expr}")
            elif (result_size(inst) == 0 or result_size(rng) == 0) and external_only(expr):
                report(True, what, "evaluates; empty here (series of another exporter: "
                       + ", ".join(sorted(EXTERNAL & set(re.findall(r"\b([a-z_]+)\{", expr)))) + ")")
            elif result_size(inst) == 0 or result_size(rng) == 0:
                hint = f" (metrics not exported: {', '.join(missing)})" if missing else ""
                report(False, what, f"empty result (instant {result_size(inst)}, range {result_size(rng)}){hint}: {expr}")
            else:
                report(True, what, f"{result_size(inst)} series")


def external_only(expr):
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{", expr))
    return bool(names) and names <= EXTERNAL


def check_annotations(prom, path, dash, values, args, report):
    """Annotation queries (reloads, drains): they must evaluate; their signal (comparisons
    removed) must have data, as for alert rules."""
    fname = path.rsplit("/", 1)[-1]
    for a in dash.get("annotations", {}).get("list", []):
        if not a.get("expr"):
            continue
        expr = substitute(a["expr"], values, args.rate_interval)
        rng = prom.range(expr, args.start, args.end, args.step)
        if rng.get("status") != "success":
            report(False, f"{fname} annotation {a.get('name')}", f"error {rng.get('error')} in {expr}")
            continue
        sig = prom.range(COMPARISON.sub("", expr), args.start, args.end, args.step)
        ok = sig.get("status") == "success" and result_size(sig) > 0
        report(ok, f"{fname} annotation {a.get('name')}",
               f"signal has {result_size(sig)} series, {result_size(rng)} marking" if ok else f"empty signal: {expr}")


def check_rules(prom, path, args, report):
    import yaml  # only needed here; present in the tools venv
    fname = path.rsplit("/", 1)[-1]
    with open(path, encoding="utf-8") as f:
        groups = (yaml.safe_load(f) or {}).get("groups", [])
    for g in groups:
        for rule in g.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            expr = str(rule["expr"]).strip()
            full = prom.instant(expr, args.end)
            if full.get("status") != "success":
                report(False, f"{fname} {name}", f"error {full.get('error')}")
                continue
            signal = unwrap_absent(COMPARISON.sub("", expr))
            sig = prom.instant(signal, args.end)
            if sig.get("status") != "success":
                report(False, f"{fname} {name} signal", f"error {sig.get('error')} in {signal}")
            elif result_size(sig) == 0:
                report(False, f"{fname} {name} signal", f"empty result: {signal}")
            else:
                firing = "condition true now" if result_size(full) else "condition false now"
                report(True, f"{fname} {name}", f"evaluates; signal has {result_size(sig)} series; {firing}")
    # the same rules as loaded by Prometheus (rule_files), evaluated by its own rule manager
    loaded = prom.get("/api/v1/rules", {})
    for g in (loaded.get("data") or {}).get("groups", []):
        for r in g.get("rules", []):
            ok = r.get("health") == "ok" and not r.get("lastError")
            state = f"state {r.get('state')}" if r.get("type") == "alerting" else "recording"
            report(ok, f"prometheus rule manager {r.get('name')}", f"health {r.get('health')}, {state}"
                   + (f", error {r.get('lastError')}" if r.get("lastError") else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--step", default="1s")
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--dashboard", action="append", default=[])
    ap.add_argument("--rules", action="append", default=[])
    args = ap.parse_args()
    prom, report = Prom(args.url), Report()
    for d in args.dashboard:
        check_dashboard(prom, d, args, report)
    for r in args.rules:
        check_rules(prom, r, args, report)
    print(f"promql checks: {report.passed} of {report.passed + report.failed} passed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
