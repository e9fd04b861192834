#!/usr/bin/env python3
"""Turn rendered Kubernetes manifests into what `podman kube play` (4.3) can run.

Usage: prep.py IN.yaml OUT.yaml [--image OLD=NEW]... [--env CONTAINER:NAME=VALUE]...
               [--publish PORTNAME=HOSTPORT]... [--host-alias HOST=IP]...
               [--secret-dir SECRET=DIR]... [--test-pod OUT-TEST.yaml]
               [--claims OUT-CLAIMS.yaml] [--meta OUT.json]

OUT.yaml gets the pods and their ConfigMaps; --claims the PersistentVolumeClaims apart (a claim
outlives its pods: it is played once, the pods as often as they are replaced); --meta, for the
script, the pod and container names, the volumes podman makes and each pod's
terminationGracePeriodSeconds.

Every change is printed on stdout, one line each, so that nothing is left out silently:
  skip  KIND/NAME (why)        objects podman kube play cannot run (Service, PDB, ...)
  edit  KIND/NAME: what        what was changed so that the object runs under podman
Kept unchanged in meaning: ConfigMaps, Secrets, PersistentVolumeClaims, Pods, Deployments.
"""
import argparse
import copy
import json
import socket
import sys

import yaml

# What podman kube play 4.3 runs; everything else is listed as skipped.
RUNNABLE = {"Pod", "Deployment", "ConfigMap", "PersistentVolumeClaim", "Secret"}
WHY = {
    "Service": "no Service proxy under podman: the script publishes the pod's ports on 127.0.0.1 (hostPort) instead",
    "ServiceAccount": "no API server: no token to mount",
    "PodDisruptionBudget": "no eviction API",
    "HorizontalPodAutoscaler": "no metrics API or controller",
    "ServiceMonitor": "prometheus-operator CRD",
    "PrometheusRule": "prometheus-operator CRD",
    "NetworkPolicy": "no CNI policy enforcement under podman's bridge network",
    "Certificate": "cert-manager CRD (the script makes the Secret itself)",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--image", action="append", default=[])
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--publish", action="append", default=[])
    ap.add_argument("--host-alias", action="append", default=[])
    ap.add_argument("--secret-dir", action="append", default=[])
    ap.add_argument("--test-pod", default="")
    ap.add_argument("--claims", default="")
    ap.add_argument("--meta", default="")
    a = ap.parse_args()
    secret_dirs = dict(x.split("=", 1) for x in a.secret_dir)
    images = dict(x.split("=", 1) for x in a.image)
    envs = []
    for x in a.env:
        cont, kv = x.split(":", 1)
        k, v = kv.split("=", 1)
        envs.append((cont, k, v))
    publish = {}
    for x in a.publish:
        p, hp = x.split("=", 1)
        publish[p] = int(hp)
    aliases = {}
    for x in a.host_alias:
        h, ip = x.split("=", 1)
        aliases.setdefault(ip, []).append(h)

    with open(a.src) as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    out, tests = [], []
    report = []

    def edit(obj, what):
        report.append(f"edit  {name_of(obj)}: {what}")

    for d in docs:
        kind = d.get("kind")
        ann = d.get("metadata", {}).get("annotations") or {}
        if kind == "Pod" and ann.get("helm.sh/hook") == "test":
            tests.append(d)
            report.append(f"skip  {name_of(d)} (helm test hook: played after the release, if asked)")
            continue
        if kind == "StatefulSet":
            d = statefulset_to_deployment(d, out, edit)
            kind = "Deployment"
        if kind not in RUNNABLE:
            report.append(f"skip  {name_of(d)} ({WHY.get(kind, 'kind not supported by podman kube play')})")
            continue
        if kind in ("Deployment", "Pod"):
            fix_workload(d, edit, images, envs, publish, aliases, secret_dirs)
        out.append(d)
    for t in tests:
        fix_workload(t, edit, images, envs, {}, aliases, secret_dirs)
    claims = [d for d in out if d["kind"] == "PersistentVolumeClaim"]
    if a.claims:
        out = [d for d in out if d["kind"] != "PersistentVolumeClaim"]
        with open(a.claims, "w") as f:
            yaml.safe_dump_all(claims, f, sort_keys=False)
    with open(a.dst, "w") as f:
        yaml.safe_dump_all(out, f, sort_keys=False)
    if a.meta:
        with open(a.meta, "w") as f:
            json.dump(meta(out, claims, tests), f, indent=1)
    if a.test_pod:
        with open(a.test_pod, "w") as f:
            yaml.safe_dump_all(tests, f, sort_keys=False)
    print("\n".join(report))


def statefulset_to_deployment(sts, out, edit):
    """The StatefulSet controller's work for pod 0: a claim per volumeClaimTemplate named
    <template>-<statefulset>-0, mounted by the pod; podman kube play has no StatefulSet."""
    name = sts["metadata"]["name"]
    spec = sts["spec"]
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": copy.deepcopy(sts["metadata"]),
        "spec": {
            "replicas": spec.get("replicas", 1),
            "selector": spec["selector"],
            "template": copy.deepcopy(spec["template"]),
        },
    }
    vols = dep["spec"]["template"]["spec"].setdefault("volumes", [])
    claims = []
    for t in spec.get("volumeClaimTemplates", []):
        claim = f"{t['metadata']['name']}-{name}-0"
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "labels": t["metadata"].get("labels", {})},
            "spec": copy.deepcopy(t["spec"]),
        }
        out.append(pvc)
        vols.append({"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}})
        claims.append(claim)
    edit(sts, "played as a Deployment (pod 0 of the StatefulSet) with the claim(s) "
         f"{', '.join(claims) or 'none'} the StatefulSet controller would create")
    return dep


def meta(out, claims, tests):
    """Names podman gives: pod <deployment>-pod-0 (or the Pod's name), containers
    <pod>-<container>, a volume per ConfigMap (named after it), emptyDir and claim."""
    pods, volumes = [], [c["metadata"]["name"] for c in claims]
    for d in out + tests:
        if d["kind"] not in ("Deployment", "Pod"):
            continue
        spec = d["spec"] if d["kind"] == "Pod" else d["spec"]["template"]["spec"]
        name = d["metadata"]["name"] + ("" if d["kind"] == "Pod" else "-pod-0")
        cms = []
        for v in spec.get("volumes", []):
            if "configMap" in v:
                cms.append({"volume": v["configMap"]["name"],
                            "mode": oct(v["configMap"].get("defaultMode", 0o644))[2:]})
                volumes.append(v["configMap"]["name"])
            elif "emptyDir" in v:
                volumes.append(v["name"])
        pods.append({
            "pod": name,
            "test": d in tests,
            "containers": [c["name"] for c in spec.get("initContainers", []) + spec["containers"]],
            "configmaps": cms,
            "grace": spec.get("terminationGracePeriodSeconds", 30),
        })
    return {"pods": pods, "volumes": sorted(set(volumes))}


def fix_workload(obj, edit, images, envs, publish, aliases, secret_dirs):
    pod = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    if obj["kind"] == "Deployment" and obj["spec"].get("replicas", 1) > 1:
        edit(obj, f"replicas {obj['spec']['replicas']} -> 1 (podman kube play runs one pod per Deployment)")
        obj["spec"]["replicas"] = 1
    inits = pod.get("initContainers") or []
    native = [c for c in inits if c.get("restartPolicy") == "Always"]
    if native:
        for c in native:
            del c["restartPolicy"]
        pod["initContainers"] = [c for c in inits if c not in native]
        if not pod["initContainers"]:
            del pod["initContainers"]
        pod["containers"] = native + pod["containers"]
        edit(obj, "native sidecar(s) " + ", ".join(c["name"] for c in native)
             + " (initContainer restartPolicy: Always) run as ordinary containers: podman 4.3 "
             "would wait for such an init container to exit, which a sidecar never does")
    for c in pod.get("initContainers", []) + pod["containers"]:
        img = c.get("image")
        if img in images:
            c["image"] = images[img]
            edit(obj, f"container {c['name']}: image {img} -> {images[img]}")
        for cont, k, v in envs:
            if cont == c["name"]:
                env = [e for e in c.get("env", []) if e["name"] != k]
                c["env"] = env + [{"name": k, "value": v}]
                edit(obj, f"container {c['name']}: env {k}={v}")
        for p in c.get("ports", []):
            if p.get("name") in publish:
                p["hostPort"] = publish[p["name"]]
                p["hostIP"] = "127.0.0.1"
                edit(obj, f"container {c['name']}: port {p['name']} ({p['containerPort']}) "
                     f"published on 127.0.0.1:{p['hostPort']} (stands in for the Service)")
            elif not p.get("hostPort"):
                # podman 4.3.1 publishes a containerPort without hostPort on the host, on the
                # same number and every address: keep it off the host's public addresses and
                # out of the way of whatever already listens there.
                p["hostPort"] = free_port()
                p["hostIP"] = "127.0.0.1"
                edit(obj, f"container {c['name']}: port {p.get('name', '')} ({p['containerPort']}) "
                     f"on 127.0.0.1:{p['hostPort']}, not on 0.0.0.0:{p['containerPort']} where "
                     "podman 4.3.1 publishes every containerPort without a hostPort")
    for v in pod.get("volumes", []):
        sec = v.get("secret")
        if sec and sec.get("secretName") in secret_dirs:
            path = secret_dirs[sec["secretName"]]
            del v["secret"]
            v["hostPath"] = {"path": path, "type": "Directory"}
            edit(obj, f"volume {v['name']}: Secret {sec['secretName']} -> hostPath {path} holding its "
                 "decoded keys: podman 4.3.1 writes a Secret volume's values still base64-encoded "
                 "(and panics on one without `optional`)")
    if aliases:
        pod.setdefault("hostAliases", []).extend(
            {"ip": ip, "hostnames": hs} for ip, hs in aliases.items())
        edit(obj, "hostAliases " + ", ".join(f"{h}={ip}" for ip, hs in aliases.items() for h in hs)
             + " (stands in for the cluster DNS of a Service)")


if __name__ == "__main__":
    sys.exit(main())
