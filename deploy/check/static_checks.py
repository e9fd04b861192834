#!/usr/bin/env python3
"""File-level checks of the deployment artefacts, for scripts/deploy-check.sh.

  values-doc CHART             every value in CHART/values.yaml is listed in CHART/README.md
  dashboard EXPOSITION FILE... Grafana JSON: parses, uid and title, unique panel ids, panels
                               inside the 24-column grid, every target has a datasource and
                               an expression, only metrics the binary exports (the families
                               of EXPOSITION, its /metrics: deploy/check/exposition.sh)
  rules EXPOSITION FILE...     alert rules use only metrics the binary exports, and
                               every alert has a severity label, a summary, a description and
                               a runbook_url whose section exists in docs/runbook.md
  schema-descriptions SCHEMA   every key of a values.schema.json (properties at any depth,
                               definitions included) has a non-empty description, and so has
                               every definition
Exit status 1 on the first failing subcommand's problems (all of them are printed).
"""
import json
import re
import sys

import yaml

def exported_families(path):
    """The metric families of a Prometheus text exposition (its `# TYPE` lines): what the
    binary exports, read from its /metrics (deploy/check/exposition.sh)."""
    with open(path, encoding="utf-8") as f:
        return {m.group(1) for m in re.finditer(r"^# TYPE (\S+) \S+$", f.read(), re.M)}


METRIC = re.compile(r"\b(proxsmtpd_[a-z_]+?)(?:_bucket|_sum|_count)?\b(?!\s*\()")


def metrics_in(expr):
    return {m for m in METRIC.findall(expr)}


def schema_descriptions(path):
    with open(path, encoding="utf-8") as f:
        schema = json.load(f)
    problems, n = [], 0

    def walk(node, where):
        nonlocal n
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        for key, sub in (node.get("properties") or {}).items():
            n += 1
            if not isinstance(sub, dict) or not str(sub.get("description", "")).strip():
                problems.append(f"{path}: {where}.properties.{key} has no description")
        for key, sub in node.items():
            if key == "properties" and isinstance(sub, dict):
                for k, v in sub.items():
                    walk(v, f"{where}.{k}")
            elif key == "definitions" and isinstance(sub, dict):
                for k, v in sub.items():
                    n += 1
                    if not str((v or {}).get("description", "")).strip():
                        problems.append(f"{path}: definition {k} has no description")
                    walk(v, f"definitions.{k}")
            elif isinstance(sub, (dict, list)):
                walk(sub, f"{where}.{key}")
    walk(schema, "$")
    return problems, f"{n} keys and definitions"


FREE_FORM = {"resources", "updateStrategy", "rspamd.resources"}   # Kubernetes objects, documented as a whole


def leaf_paths(value, prefix=""):
    """Dotted paths of the documented values: leaves, and empty or free-form maps and lists."""
    if (isinstance(value, dict) and value and prefix not in FREE_FORM
            and not prefix.endswith(("labels", "annotations"))):
        out = []
        for k, v in value.items():
            out.extend(leaf_paths(v, f"{prefix}.{k}" if prefix else k))
        return out
    return [prefix]


def values_doc(chart):
    with open(f"{chart}/values.yaml", encoding="utf-8") as f:
        values = yaml.safe_load(f)
    with open(f"{chart}/README.md", encoding="utf-8") as f:
        readme = f.read()
    table = readme.split("\n## Values\n", 1)[-1]
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", table, re.M))
    problems = [f"values.yaml `{p}` is not in the README's values table" for p in leaf_paths(values)
                if p not in documented]
    problems += [f"README documents `{p}`, which values.yaml does not have" for p in sorted(documented)
                 if p not in set(leaf_paths(values))]
    return problems, f"{len(documented)} values documented"


def panels_of(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def dashboard(files, exported):
    problems, n = [], 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                dash = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"{path}: {e}")
            continue
        for key in ("uid", "title", "panels", "templating", "schemaVersion"):
            if not dash.get(key):
                problems.append(f"{path}: no {key}")
        ids = [p.get("id") for p in panels_of(dash)]
        if len(ids) != len(set(ids)) or None in ids:
            problems.append(f"{path}: panel ids missing or repeated: {ids}")
        for p in panels_of(dash):
            g = p.get("gridPos") or {}
            if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
                problems.append(f"{path}: panel {p.get('id')} gridPos {g} outside the 24-column grid")
            if p.get("type") == "row":
                continue
            if not p.get("targets"):
                problems.append(f"{path}: panel {p.get('id')} \"{p.get('title')}\" has no targets")
            for t in p.get("targets", []):
                n += 1
                if not (t.get("datasource") or p.get("datasource")):
                    problems.append(f"{path}: panel {p.get('id')} target {t.get('refId')} has no datasource")
                if not t.get("expr"):
                    problems.append(f"{path}: panel {p.get('id')} target {t.get('refId')} has no expr")
                unknown = metrics_in(t.get("expr", "")) - exported
                if unknown:
                    problems.append(f"{path}: panel {p.get('id')} uses metrics the binary does not export: {sorted(unknown)}")
    return problems, f"{n} queries"


def runbook_anchors():
    """GitHub-style anchors of the headings of docs/runbook.md (next to deploy/)."""
    import os
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    try:
        with open(os.path.join(root, "docs", "runbook.md"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return set()
    heads = re.findall(r"^#{1,6}\s+(.*?)\s*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}


def rules(files, exported):
    problems, n = [], 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for g in doc.get("groups", []):
            for r in g.get("rules", []):
                n += 1
                name = r.get("alert") or r.get("record")
                unknown = metrics_in(str(r.get("expr", ""))) - exported
                if unknown:
                    problems.append(f"{path}: {name} uses metrics the binary does not export: {sorted(unknown)}")
                if r.get("alert"):
                    if not (r.get("labels") or {}).get("severity"):
                        problems.append(f"{path}: {name} has no severity label")
                    for a in ("summary", "description", "runbook_url"):
                        if not (r.get("annotations") or {}).get(a):
                            problems.append(f"{path}: {name} has no {a} annotation")
                    url = (r.get("annotations") or {}).get("runbook_url", "")
                    if url:
                        doc, _, anchor = url.partition("#")
                        if not doc.endswith("docs/runbook.md") or anchor not in runbook_anchors():
                            problems.append(f"{path}: {name} runbook_url {url} is not a section of docs/runbook.md")
    return problems, f"{n} rules"


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("values-doc", "dashboard", "rules", "schema-descriptions"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    problems, summary = {"values-doc": lambda: values_doc(args[0]), "dashboard": lambda: dashboard(args[1:], exported_families(args[0])),
                         "rules": lambda: rules(args[1:], exported_families(args[0])),
                         "schema-descriptions": lambda: schema_descriptions(args[0])}[cmd]()
    for p in problems:
        print(f"problem: {p}")
    print(f"{cmd}: {summary}, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
