#!/usr/bin/env python3
"""Strict offline validation of Kubernetes manifests, for scripts/deploy-check.sh.

Built-in kinds are checked against the JSON schemas shipped in the PyPI package
kubernetes-validate, in their "-strict" flavour (a field the API does not know is an error),
for every Kubernetes version given with -k. All errors of an object are reported.

prometheus-operator kinds (ServiceMonitor, PrometheusRule, ...) are checked with the npm
package @kubernetes-models/prometheus-operator (--prom-models DIR, the directory holding its
node_modules): its compiled validators check types and required fields, and, because they
accept unknown fields, this script also walks the package's TypeScript declarations (*.d.ts)
and reports every key that no interface declares.

Any other kind is an error. So are a document without apiVersion, kind or metadata.name, and
the same object twice in one file. Exit status 0 only if every document passed.

Usage: k8s_strict.py [-k 1.29.0]... [--prom-models DIR] [-q] FILE...
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys

import jsonschema
import yaml
from referencing import Registry, Resource

import kubernetes_validate.utils as kv

PROM_GROUP = "monitoring.coreos.com/"


def load_documents(path):
    """Yield (label, document) for every non-empty YAML document in a file; List items apart."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for i, doc in enumerate(yaml.safe_load_all(text)):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            for j, item in enumerate(doc["items"]):
                yield f"{path}#{i}.items[{j}]", item
        else:
            yield f"{path}#{i}", doc


@functools.lru_cache(maxsize=None)
def schema_validator(kind, api_version, k8s_version):
    """A validator for kind/apiVersion at a Kubernetes version, or None if there is no schema."""
    # kubernetes-validate names schemas <kind>-<group prefix>-<version>.json
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    known = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(k8s_version)]
    if not known:
        raise SystemExit(f"no bundled schemas for Kubernetes {k8s_version}")
    base = f"kubernetes-json-schema/v{known[-1]}-local-strict"
    try:
        schema = kv.schema_contents(f"{base}/{kind.lower()}-{group_version}.json", k8s_version)
    except FileNotFoundError:
        return None
    definitions = kv.schema_contents(f"{base}/_definitions.json", k8s_version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


class TsDeclarations:
    """Property names of the interfaces in @kubernetes-models/* declaration files."""

    PROP = re.compile(r'^    "([^"]+)"\??: (.*?);?$')
    IMPORT = re.compile(r'^import \{ (\w+) \} from "([^"]+)";')
    NAMED = re.compile(r"^(?:Array<)?(I\w+)>?$")

    def __init__(self, node_dir):
        self.modules = os.path.join(node_dir, "node_modules")

    # one TsDeclarations per run: the cache holding `self` lives no longer than the process would
    @functools.lru_cache(maxsize=None)  # noqa: B019
    def interface(self, dts_path):
        """{property: declaration file of its type or None} of the first interface in a file;
        None when the file declares no interface (a type alias such as Duration)."""
        if not os.path.exists(dts_path):
            return None
        with open(dts_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        imports = {}
        for line in lines:
            m = self.IMPORT.match(line)
            if m:
                imports[m.group(1)] = m.group(2)
        props, inside = {}, False
        for line in lines:
            if line.startswith("export interface "):
                inside = True
                continue
            if inside and line.startswith("}"):
                return props
            m = self.PROP.match(line) if inside else None
            if m:
                named = self.NAMED.match(m.group(2).strip())
                props[m.group(1)] = self.resolve(dts_path, imports.get(named.group(1))) if named else None
        return None

    def resolve(self, from_file, spec):
        if not spec:
            return None
        if spec.startswith("."):
            return os.path.normpath(os.path.join(os.path.dirname(from_file), spec[:-3] + ".d.ts"))
        return os.path.join(self.modules, spec + ".d.ts")

    def unknown_fields(self, value, dts_path, path):
        """Dotted paths of keys in value that its interface (and the ones below) do not declare."""
        props = self.interface(dts_path) if dts_path else None
        if props is None:
            return []
        if isinstance(value, list):
            return [e for i, item in enumerate(value) for e in self.unknown_fields(item, dts_path, f"{path}[{i}]")]
        if not isinstance(value, dict):
            return []
        found = []
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if key not in props:
                found.append(where)
            elif key != "metadata":          # ObjectMeta: the Kubernetes schemas know it
                found.extend(self.unknown_fields(sub, props[key], where))
        return found

    def kind_file(self, api_version, kind):
        version = api_version.split("/", 1)[1]
        return os.path.join(self.modules, "@kubernetes-models/prometheus-operator",
                            "monitoring.coreos.com", version, f"{kind}.d.ts")


NODE_CHECK = r"""
const docs = JSON.parse(require('fs').readFileSync(0, 'utf8'));
(async () => {
  const out = [];
  for (const d of docs) {
    const ver = d.apiVersion.split('/')[1];
    try {
      const mod = await import(`@kubernetes-models/prometheus-operator/monitoring.coreos.com/${ver}/${d.kind}`);
      new mod[d.kind](d).validate();
      out.push(null);
    } catch (e) { out.push(String(e.message || e)); }
  }
  console.log(JSON.stringify(out));
})();
"""


def check_prometheus_operator(node_dir, docs):
    """Type-check prometheus-operator objects in one node process; one message or None each."""
    if not docs:
        return []
    p = subprocess.run(["node", "-e", NODE_CHECK], input=json.dumps(docs), capture_output=True,
                       text=True, cwd=node_dir, check=False)
    if p.returncode != 0:
        return [f"node failed: {p.stderr.strip()}"] * len(docs)
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", "--kubernetes-version", action="append")
    ap.add_argument("--prom-models", help="directory whose node_modules has @kubernetes-models/prometheus-operator")
    ap.add_argument("-q", "--quiet", action="store_true", help="print errors and the summary only")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    versions = args.kubernetes_version or [kv.latest_version()]

    errors, count, seen, prom = 0, 0, {}, []

    def report(ok, label, msg):
        nonlocal errors
        if not ok:
            errors += 1
            print(f"ERROR {label}: {msg}")
        elif not args.quiet:
            print(f"OK    {label}: {msg}")

    for path in args.files:
        try:
            docs = list(load_documents(path))
        except (OSError, yaml.YAMLError) as e:
            report(False, path, f"cannot read: {e}")
            continue
        if not docs:
            report(False, path, "no Kubernetes documents")
        for where, doc in docs:
            count += 1
            if not isinstance(doc, dict):
                report(False, where, "not a mapping")
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            name = meta.get("name") or meta.get("generateName")
            missing = [f for f in ("apiVersion", "kind") if not isinstance(doc.get(f), str) or not doc[f]]
            if not name:
                missing.append("metadata.name")
            if missing:
                report(False, where, "missing " + ", ".join(missing))
                continue
            api, kind = doc["apiVersion"], doc["kind"]
            label = f"{where} {kind}/{name}"
            ident = (path, api, kind, meta.get("namespace", ""), name)
            if ident in seen:
                report(False, label, f"duplicate of {seen[ident]}")
            seen[ident] = where
            if api.startswith(PROM_GROUP):
                prom.append((label, doc))
                continue
            for version in versions:
                validator = schema_validator(kind, api, version)
                if validator is None:
                    report(False, label, f"no Kubernetes {version} schema for {api} {kind}")
                    break
                errs = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
                for e in errs:
                    report(False, label, f"(k8s {version}) {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
                if not errs:
                    report(True, label, f"k8s {version} strict schema")

    if prom:
        if not args.prom_models:
            for label, _ in prom:
                report(False, label, "prometheus-operator kind, but no --prom-models to check it with")
        else:
            ts = TsDeclarations(args.prom_models)
            results = check_prometheus_operator(args.prom_models, [d for _, d in prom])
            for (label, doc), msg in zip(prom, results, strict=True):
                dts = ts.kind_file(doc["apiVersion"], doc["kind"])
                if not os.path.exists(dts):
                    report(False, label, f"no @kubernetes-models/prometheus-operator model for {doc['apiVersion']} {doc['kind']}")
                    continue
                unknown = ts.unknown_fields(doc, dts, "")
                if msg:
                    report(False, label, f"@kubernetes-models/prometheus-operator: {msg}")
                for u in unknown:
                    report(False, label, f"unknown field {u} (not in the prometheus-operator type declarations)")
                if not msg and not unknown:
                    report(True, label, "@kubernetes-models/prometheus-operator types + declared fields")

    print(f"{count} documents, {errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
