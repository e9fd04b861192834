#!/usr/bin/env python3
"""rspamd configuration checks, for scripts/deploy-check.sh.

  extract FILE PREFIX DIR   write the data of the one ConfigMap of FILE (a rendered manifest)
                            whose name starts with PREFIX into DIR, a file per key (rspamd's
                            local.d)
  milter-worker ADDRESS     read `rspamadm configdump -j worker` on stdin: the proxy worker
                            must speak the milter protocol (milter = yes), bind ADDRESS and
                            scan messages itself (self_scan), as proxsmtpd's Milters expects
Exit status 1 when the check fails.
"""
import json
import sys

import yaml


def extract(path, prefix, outdir):
    with open(path, encoding="utf-8") as f:
        cms = [c for c in yaml.safe_load_all(f) if isinstance(c, dict) and c.get("kind") == "ConfigMap"
               and c["metadata"]["name"].startswith(prefix)]
    if len(cms) != 1:
        print(f"{len(cms)} ConfigMaps named {prefix}* in {path}")
        return 1
    for name, text in cms[0]["data"].items():
        with open(f"{outdir}/{name}", "w", encoding="utf-8") as f:
            f.write(text)
    print(f"{cms[0]['metadata']['name']}: {sorted(cms[0]['data'])}")
    return 0


def milter_worker(address):
    # configdump prints one JSON object per worker, one after the other
    text, dec, docs, i = sys.stdin.read(), json.JSONDecoder(), [], 0
    while text[i:].strip():
        i += len(text[i:]) - len(text[i:].lstrip())
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    proxies = [d["rspamd_proxy"] for d in docs if "rspamd_proxy" in d]
    if len(proxies) != 1:
        print(f"{len(proxies)} rspamd_proxy workers in {len(docs)} workers")
        return 1
    p = proxies[0]
    print("rspamd_proxy:", json.dumps(p))
    problems = []
    if p.get("milter") is not True:
        problems.append("milter is not on")
    if p.get("bind_socket") != address:
        problems.append(f"bind_socket {p.get('bind_socket')!r}, not {address!r}")
    if not any(u.get("self_scan") is True for u in (p.get("upstream") or {}).values()):
        problems.append("no upstream with self_scan")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "extract":
        return extract(*sys.argv[2:])
    if len(sys.argv) == 3 and sys.argv[1] == "milter-worker":
        return milter_worker(sys.argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
