#!/usr/bin/env python3
"""Assertions on a rendered manifest, for scripts/deploy-check.sh.

Usage: render_asserts.py FILE EXPR...
Each EXPR is a Python expression that must be true, evaluated with:
  docs            every rendered object (dicts)
  kind(K)         the objects of kind K
  obj(K, NAME)    the object of kind K named NAME
  template()      the pod template of the (single) Deployment or StatefulSet
  pod()           its pod spec
  container(N)    the container or initContainer named N in it
  alerts()        the alerting rules of every PrometheusRule
  setting(NAME)   the value of the `NAME:` line of the rendered proxsmtpd.conf (None if absent)
Prints one ok/FAIL line per expression; exit status 1 if any is false or raises.
"""
import sys

import yaml


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]

    def kind(k):
        return [d for d in docs if d.get("kind") == k]

    def obj(k, name):
        (o,) = [d for d in kind(k) if d["metadata"]["name"] == name]
        return o

    def template():
        (w,) = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet")]
        return w["spec"]["template"]

    def pod():
        return template()["spec"]

    def container(name):
        (c,) = [c for c in (pod().get("containers") or []) + (pod().get("initContainers") or [])
                if c.get("name") == name]
        return c

    def alerts():
        return [r for p in kind("PrometheusRule") for g in p["spec"]["groups"] for r in g["rules"] if "alert" in r]

    def setting(name):
        (conf,) = [c["data"]["proxsmtpd.conf"] for c in kind("ConfigMap") if "proxsmtpd.conf" in (c.get("data") or {})]
        values = [line.split(":", 1)[1].strip() for line in conf.splitlines() if line.split(":", 1)[0].strip() == name]
        return values[-1] if values else None

    env = {"setting": setting, "docs": docs, "kind": kind, "obj": obj, "template": template, "pod": pod, "container": container, "alerts": alerts}
    bad = 0
    for expr in sys.argv[2:]:
        try:
            ok, why = bool(eval(expr, env)), ""
        except Exception as e:  # a missing key is a failed assertion, said as such
            ok, why = False, f" ({type(e).__name__}: {e})"
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {expr}{why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
