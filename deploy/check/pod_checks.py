#!/usr/bin/env python3
"""Checks on the rendered proxsmtpd pod, for scripts/deploy-check.sh.

Given one rendered manifest file (helm template or kubectl kustomize output) and the layout
it must have, finds the workload whose pod runs the container "proxsmtpd" and checks:
  layout     standalone: the proxy is a regular container (extraContainers may run next to it); sidecar-native: it is an
             initContainer with restartPolicy Always next to the mail container(s);
             sidecar-plain: a plain container next to them
  security   runAsNonRoot, allowPrivilegeEscalation false, drop ALL, seccomp RuntimeDefault,
             readOnlyRootFilesystem, not privileged
  probes     liveness GET /livez and readiness GET /readyz on the admin port
  shutdown   a preStop sleep; terminationGracePeriodSeconds >= preStop + DrainTimeout
  config     -f names proxsmtpd.conf in a mounted ConfigMap of the same render; Listen and
             AdminListen match the container ports, AdminListen not on loopback (the kubelet
             probes the pod IP); TempDirectory is an emptyDir mount; FilterCommand, when it
             names a mounted file, exists in its ConfigMap, mounted with mode 0755
  rollout    a config or script change reaches the proxy: ReloadWatch on (reloaded in place,
             no restart of the mail containers), a checksum/config annotation on the pod
             template, or every mounted ConfigMap with a kustomize content-hash name; with the
             chart's ConfigMap, a checksum/restart-settings annotation for the settings read
             once at start
  queue      --persistent-queue DIR: a mail container mounts a PersistentVolumeClaim (or a
             StatefulSet volumeClaimTemplate) at DIR, so deferred mail outlives the pod
  resources  cpu and memory requests, a memory limit
  env        PROXSMTPD_CONTAINER=on, no service-link variables
  service    a Service selects the pod and sends a port to the proxy's SMTP port
  mounts     no ConfigMap or Secret mounted with subPath (its updates would never reach the pod)
  tls        with TlsCertificate (config file or PROXSMTPD_* env): certificate and key in one
             Secret volume mounted whole and read-only, files readable by the non-root proxy
             (mode 0440 with an fsGroup, else 0444); TlsRequired and TlsListen only with a
             certificate; TlsListen on the container port "smtps", which a Service targets;
             UpstreamTlsCa in a mounted Secret or ConfigMap; UpstreamTlsCa and
             UpstreamTlsVerify only with UpstreamTls on, verification off only towards
             loopback (an upstream in the same pod). --tls: TLS must be on;
             --no-tls: no TLS setting at all (STARTTLS stays refused)
  milters    with Milters: a milter on loopback (inet:127.0.0.1, localhost, [::1]) is a
             container port of another container of the pod; a unix: socket lies in a volume
             the proxy and another container mount (not a ConfigMap or Secret); with
             MilterQuarantine hold (the default), MilterQuarantineDirectory (default
             /var/lib/proxsmtpd/quarantine) is on a writable volume that is not the spool
  hooks      with Hooks: a hook on loopback is a container port of another container of the
             pod; HookCaFile, HookClientCertificate, HookClientKey, HookTokenFile and each
             hook's ca_file, client_certificate, client_key, token_file lie in a mounted
             volume, a Secret one mounted whole (no subPath: a renewed certificate or a
             rotated token reaches the pod) and read-only, the key and the token readable by
             the non-root proxy; a client certificate comes with its key; the quarantine as
             with milters (a hook may quarantine)
  --existing FILE: objects that exist in the cluster apart from the render (e.g. the
             ConfigMaps that config.existingConfigMap and filters.existingConfigMap name)
Prints one line per check; exit status 1 if any failed.

Usage: pod_checks.py FILE standalone|sidecar-native|sidecar-plain [--tls|--no-tls]
                     [--existing FILE] [--persistent-queue DIR]
"""
import re
import sys

import yaml

SPOOL = "/var/spool/proxsmtpd"


class Checker:
    def __init__(self, label):
        self.label, self.failed, self.count = label, 0, 0

    def check(self, ok, what):
        self.count += 1
        if not ok:
            self.failed += 1
        print(f"{'ok  ' if ok else 'FAIL'} {self.label}: {what}")
        return ok


def parse_conf(text):
    """proxsmtpd.conf: Name: value lines; names case-insensitive; # comments."""
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, value = line.split(":", 1)
        conf[name.strip().lower()] = value.strip()
    return conf


def port_of(addr):
    m = re.search(r"(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def effective_settings(conf, env):
    """The config file's settings with the PROXSMTPD_<UPPER_SNAKE> variables over them."""
    out = dict(conf)
    for name, value in env.items():
        if name.startswith("PROXSMTPD_") and value is not None:
            out[name[len("PROXSMTPD_"):].replace("_", "").lower()] = value
    return out


def mounted_file(path, mounts, volumes):
    """(mount, volume, file name inside the volume) for a file under a volume mount."""
    for mpath, m in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if path.startswith(mpath + "/"):
            return m, volumes.get(m["name"], {}), path[len(mpath) + 1:]
    return None, {}, None


def file_mode(source, name):
    """The mode a Secret or ConfigMap volume gives one of its files (Kubernetes default 0644)."""
    for item in source.get("items") or []:
        if item.get("path") == name:
            return item.get("mode", source.get("defaultMode", 0o644))
    return source.get("defaultMode", 0o644)


def check_tls(c, settings, expect, ctr, pod, mounts, volumes, ports, services):
    cert, key = settings.get("tlscertificate"), settings.get("tlskey")

    def on(v):
        return str(v).lower() in ("on", "yes", "true", "1")

    if expect == "off":
        names = sorted(k for k in settings if k.startswith(("tls", "upstreamtls")))
        c.check(not names, f"no TLS setting (STARTTLS stays refused): {names or 'none'}")
        return
    if not cert:
        c.check(expect != "on", "TlsCertificate set" if expect == "on" else "TLS off (no TlsCertificate)")
        c.check(not on(settings.get("tlsrequired", "off")) and not settings.get("tlslisten"),
                "no TlsRequired or TlsListen without a certificate")
    else:
        c.check(bool(key), f"TlsCertificate {cert} and TlsKey {key} set")
        fsgroup = (pod.get("securityContext") or {}).get("fsGroup")
        mc, vc, nc = mounted_file(cert, mounts, volumes)
        mk, vk, nk = mounted_file(key or "", mounts, volumes)
        secret = vc.get("secret")
        c.check(secret is not None and mc is mk,
                f"certificate and key in one mounted Secret ({(secret or {}).get('secretName')})")
        if mc is not None:
            c.check("subPath" not in mc and "subPathExpr" not in mc and "/" not in (nc or "/"),
                    f"the Secret is mounted whole at {mc['mountPath']}, no subPath (renewals reach the pod)")
            c.check(mc.get("readOnly") is True, "the TLS Secret is mounted readOnly")
        if secret is not None and nk:
            mode = file_mode(secret, nk)
            readable = bool(mode & 0o004) or (bool(mode & 0o040) and fsgroup is not None)
            c.check(readable and not mode & 0o002,
                    f"key mode {mode:04o} readable by the non-root proxy (fsGroup {fsgroup}), not writable")
        listen = settings.get("tlslisten")
        if listen:
            c.check(port_of(listen) == ports.get("smtps") and port_of(listen) != ports.get("smtp"),
                    f"TlsListen {listen} is the container port smtps ({ports.get('smtps')})")
            labels = pod.get("_labels") or {}
            targeted = any(
                all(labels.get(k) == v for k, v in (s["spec"].get("selector") or {}).items())
                and any(p.get("targetPort") in ("smtps", ports.get("smtps")) for p in s["spec"].get("ports") or [])
                for s in services if s["spec"].get("selector"))
            c.check(targeted, "a Service targets the proxy's smtps port")
        elif expect == "on":
            c.check(True, "no TlsListen (STARTTLS only)")
    upstream = (settings.get("upstreamtls") or "off").lower()
    ca, verify = settings.get("upstreamtlsca"), settings.get("upstreamtlsverify")
    if upstream == "off":
        c.check(not ca and verify is None, "no UpstreamTlsCa or UpstreamTlsVerify while UpstreamTls is off")
        return
    c.check(upstream in ("opportunistic", "required"), f"UpstreamTls {upstream}")
    if ca:
        m, v, n = mounted_file(ca, mounts, volumes)
        source = v.get("secret") or v.get("configMap")
        c.check(source is not None and m is not None and "subPath" not in m and "/" not in (n or "/"),
                f"UpstreamTlsCa {ca} in a Secret or ConfigMap mounted whole")
    if verify is not None and not on(verify):
        host = (settings.get("outaddress") or "").rsplit(":", 1)[0].strip("[]")
        c.check(host in ("127.0.0.1", "::1", "localhost"),
                f"UpstreamTlsVerify off only for an upstream in the same pod (OutAddress {settings.get('outaddress')})")


def milter_addresses(value):
    """The addresses of a Milters value (Postfix's smtpd_milters syntax): each word outside
    braces, and the first item of a `{ address, options }` group."""
    out, depth, word, group = [], 0, "", ""
    for ch in value + " ":
        if ch == "{":
            if depth == 0 and word.strip():
                out.append(word.strip())
            word, depth, group = "", depth + 1, ""
        elif ch == "}":
            depth -= 1
            first = group.split(",")[0].strip()
            if depth == 0 and first and "=" not in first:
                out.append(first)
        elif depth:
            group += ch
        elif ch in " ,\t":
            if word.strip():
                out.append(word.strip())
            word = ""
        else:
            word += ch
    return out


def check_milters(c, settings, ctr, pod, mounts, volumes):
    value = settings.get("milters")
    if not value:
        return
    others = [x for x in (pod.get("containers") or []) + (pod.get("initContainers") or [])
              if x.get("name") != ctr.get("name")]
    for addr in milter_addresses(value):
        if addr.startswith("unix:"):
            path = addr[len("unix:"):]
            m, v, _ = mounted_file(path, mounts, volumes)
            shared = m is not None and any(
                any(om["name"] == m["name"] for om in o.get("volumeMounts") or []) for o in others)
            c.check(m is not None and not any(k in v for k in ("configMap", "secret", "projected")) and shared,
                    f"milter {addr}: the socket's volume ({(m or {}).get('name')}) is shared with the milter's container")
            continue
        hp = re.sub(r"^inet6?:", "", addr)
        host, port = hp.rsplit(":", 1)[0].strip("[]"), port_of(hp)
        if host in ("127.0.0.1", "localhost", "::1"):
            owners = [o["name"] for o in others if any(p.get("containerPort") == port for p in o.get("ports") or [])]
            c.check(bool(owners), f"milter {addr} on loopback: a container of the pod listens there ({owners or 'none'})")
        else:
            c.check(True, f"milter {addr}: a network service")
    check_quarantine(c, settings, mounts, volumes)


def check_quarantine(c, settings, mounts, volumes):
    # hold is the default, and its directory is on the image's read-only root file system
    # unless a volume is mounted there
    if (settings.get("milterquarantine") or "hold").lower() == "hold":
        qdir = (settings.get("milterquarantinedirectory") or "/var/lib/proxsmtpd/quarantine").rstrip("/")
        m, v, _ = mounted_file(qdir + "/held", mounts, volumes)
        c.check(bool(qdir) and m is not None and not m.get("readOnly") and m["mountPath"].rstrip("/") != SPOOL
                and any(k in v for k in ("emptyDir", "persistentVolumeClaim", "ephemeral")),
                f"MilterQuarantineDirectory {qdir or '(none)'} on a writable volume of its own ({(m or {}).get('name')})")


def hook_entries(value):
    """The hooks of a Hooks value: (url, {option: value}) for each comma-separated URL with
    its optional `{name=value, ...}` options."""
    out, depth, cur = [], 0, ""
    for ch in value + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            if cur.strip():
                url, _, opts = cur.strip().partition("{")
                pairs = [o.split("=", 1) for o in opts.rstrip("}").split(",") if "=" in o]
                out.append((url.strip(), {k.strip(): v.strip() for k, v in pairs}))
            cur = ""
        else:
            cur += ch
    return out


def check_hooks(c, settings, ctr, pod, mounts, volumes):
    value = settings.get("hooks")
    if not value:
        return
    others = [x for x in (pod.get("containers") or []) + (pod.get("initContainers") or [])
              if x.get("name") != ctr.get("name")]
    fsgroup = (pod.get("securityContext") or {}).get("fsGroup")
    hooks = hook_entries(value)
    c.check(bool(hooks), f"Hooks names {len(hooks)} hook(s)")
    files = []   # (what, path, secret: must not be world- or group-less unreadable)
    for what, key in (("HookCaFile", "hookcafile"), ("HookClientCertificate", "hookclientcertificate"),
                      ("HookClientKey", "hookclientkey"), ("HookTokenFile", "hooktokenfile")):
        if settings.get(key):
            files.append((what, settings[key]))
    c.check(bool(settings.get("hookclientcertificate")) == bool(settings.get("hookclientkey")),
            "HookClientCertificate and HookClientKey set together (or neither)")
    for url, opts in hooks:
        label = opts.get("name") or url
        m = re.match(r"^(https?)://(\[[^]]+\]|[^/:]+)(?::(\d+))?", url)
        if not c.check(m is not None, f"hook {label}: {url} is an http(s) URL"):
            continue
        scheme, host, port = m.group(1), m.group(2).strip("[]"), m.group(3)
        port = int(port) if port else (443 if scheme == "https" else 80)
        if host in ("127.0.0.1", "localhost", "::1"):
            owners = [o["name"] for o in others if any(p.get("containerPort") == port for p in o.get("ports") or [])]
            c.check(bool(owners), f"hook {label} on loopback: a container of the pod listens on {port} ({owners or 'none'})")
        else:
            c.check(True, f"hook {label}: a network service ({host}:{port})")
        c.check(("client_certificate" in opts) == ("client_key" in opts),
                f"hook {label}: client_certificate and client_key together (or neither)")
        for opt in ("ca_file", "client_certificate", "client_key", "token_file"):
            if opts.get(opt):
                files.append((f"hook {label} {opt}", opts[opt]))
    for what, path in files:
        m, v, name = mounted_file(path, mounts, volumes)
        if not c.check(m is not None, f"{what} {path} lies in a mounted volume ({(m or {}).get('name')})"):
            continue
        source = v.get("secret") or v.get("configMap") or v.get("projected")
        if source is None:
            continue
        c.check("subPath" not in m and "subPathExpr" not in m,
                f"{what}: its volume {m['name']} mounted whole, no subPath (updates reach the pod)")
        c.check(m.get("readOnly") is True, f"{what}: its volume {m['name']} mounted readOnly")
        if "secret" in v and what.endswith(("Key", "TokenFile", "client_key", "token_file")):
            mode = file_mode(v["secret"], name)
            readable = bool(mode & 0o004) or (bool(mode & 0o040) and fsgroup is not None)
            c.check(readable and not mode & 0o002,
                    f"{what}: mode {mode:04o} readable by the non-root proxy (fsGroup {fsgroup}), not writable")
    if not settings.get("milters"):
        check_quarantine(c, settings, mounts, volumes)


def main():
    argv, existing, queue = sys.argv[1:], [], None
    while "--existing" in argv[:-1] or "--persistent-queue" in argv[:-1]:
        for opt in ("--existing", "--persistent-queue"):
            if opt in argv[:-1]:
                i = argv.index(opt)
                value = argv[i + 1]
                del argv[i:i + 2]
                if opt == "--existing":
                    existing.append(value)
                else:
                    queue = value.rstrip("/")
    args = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    if (len(args) != 2 or args[1] not in ("standalone", "sidecar-native", "sidecar-plain")
            or any(f not in ("--tls", "--no-tls") for f in flags) or len(flags) > 1):
        print(__doc__.split("Usage: ")[1].strip(), file=sys.stderr)
        return 2
    path, layout = args
    expect = {"--tls": "on", "--no-tls": "off"}.get(flags[0] if flags else "", "any")
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    c = Checker(f"{path.rsplit('/', 1)[-1]} [{layout}]")
    outside = []
    for name in existing:
        with open(name, encoding="utf-8") as f:
            outside += [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    configmaps = {d["metadata"]["name"]: d for d in docs + outside if d.get("kind") == "ConfigMap"}
    workloads = [d for d in docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]

    found = []
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        for where in ("containers", "initContainers"):
            for ctr in spec.get(where) or []:
                if ctr.get("name") == "proxsmtpd":
                    found.append((w, where, ctr))
    if not c.check(len(found) == 1, f"exactly one workload runs the proxsmtpd container (found {len(found)})"):
        return 1
    w, where, ctr = found[0]
    tmpl = w["spec"]["template"]
    pod = tmpl["spec"]
    others = [x for x in pod.get("containers") or [] if x.get("name") != "proxsmtpd"]

    # --- layout ---
    if layout == "standalone":
        c.check(where == "containers" and not pod.get("initContainers"),
                "standalone: the proxy is a regular container, no init containers"
                + (f" (extra containers: {[x['name'] for x in others]})" if others else ""))
    elif layout == "sidecar-native":
        c.check(where == "initContainers" and ctr.get("restartPolicy") == "Always",
                "native sidecar: initContainer with restartPolicy Always")
        c.check(len(others) >= 1, f"native sidecar: mail container(s) next to it ({[x['name'] for x in others]})")
    else:
        c.check(where == "containers" and "restartPolicy" not in ctr, "plain sidecar: a regular container")
        c.check(len(others) >= 1, f"plain sidecar: mail container(s) next to it ({[x['name'] for x in others]})")

    # --- security context ---
    sc, psc = ctr.get("securityContext") or {}, pod.get("securityContext") or {}
    c.check(sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc), "runAsNonRoot")
    c.check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    c.check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), "capabilities drop ALL")
    c.check(not (sc.get("capabilities") or {}).get("add"), "no capabilities added")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    c.check(seccomp == "RuntimeDefault", f"seccompProfile RuntimeDefault ({seccomp})")
    c.check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
    c.check(not sc.get("privileged"), "not privileged")
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    c.check(uid is None or uid != 0, f"runAsUser not 0 ({uid})")
    if layout == "standalone":
        c.check(psc.get("runAsNonRoot") is True and (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                "pod securityContext restricted (runAsNonRoot, seccomp RuntimeDefault)")
    c.check(pod.get("automountServiceAccountToken") is False, "no service account token mounted")
    c.check(pod.get("enableServiceLinks") is False,
            "enableServiceLinks: false (no service-link variables in the environment)")

    # --- ports and probes ---
    ports = {p.get("name"): p.get("containerPort") for p in ctr.get("ports") or []}
    c.check("smtp" in ports and "admin" in ports, f"named ports smtp and admin ({ports})")

    def probe_ok(probe, path):
        get = (ctr.get(probe) or {}).get("httpGet") or {}
        return get.get("path") == path and get.get("port") in ("admin", ports.get("admin"))
    c.check(probe_ok("livenessProbe", "/livez"), "livenessProbe GET /livez on the admin port")
    c.check(probe_ok("readinessProbe", "/readyz"), "readinessProbe GET /readyz on the admin port")

    # --- config ---
    mounts = {m["mountPath"].rstrip("/"): m for m in ctr.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    args = (ctr.get("command") or []) + (ctr.get("args") or [])
    conf_path = args[args.index("-f") + 1] if "-f" in args[:-1] else "/etc/proxsmtpd/proxsmtpd.conf"
    conf_dir, conf_file = conf_path.rsplit("/", 1)
    conf_mount = mounts.get(conf_dir)
    conf_cm = None
    if conf_mount:
        cm_name = (volumes.get(conf_mount["name"], {}).get("configMap") or {}).get("name")
        conf_cm = configmaps.get(cm_name)
    if not c.check(conf_cm is not None and conf_file in (conf_cm.get("data") or {}),
                   f"-f {conf_path} is a key of a ConfigMap in this render, mounted at {conf_dir}"):
        conf = {}
    else:
        conf = parse_conf(conf_cm["data"][conf_file])
    env = {e["name"]: e.get("value") for e in ctr.get("env") or []}
    c.check(env.get("PROXSMTPD_CONTAINER") == "on", "env PROXSMTPD_CONTAINER=on")
    c.check(port_of(conf.get("listen")) == ports.get("smtp"), f"Listen {conf.get('listen')} matches port smtp")
    admin = conf.get("adminlisten", "")
    c.check(port_of(admin) == ports.get("admin") and not admin.startswith(("127.", "localhost", "[::1]")),
            f"AdminListen {admin} matches port admin, not on loopback")
    c.check(bool(conf.get("outaddress")), f"OutAddress set ({conf.get('outaddress')})")
    spool = conf.get("tempdirectory", "").rstrip("/")
    spool_mount = mounts.get(spool)
    c.check(spool == SPOOL and spool_mount is not None and "emptyDir" in volumes.get(spool_mount["name"], {}),
            f"TempDirectory {spool} is an emptyDir mount")
    cmd = conf.get("filtercommand", "")
    script = cmd.split()[0] if cmd else ""
    if script.startswith("/etc/"):
        sdir, sname = script.rsplit("/", 1)
        smount = mounts.get(sdir)
        svol = volumes.get(smount["name"], {}) if smount else {}
        scm = configmaps.get((svol.get("configMap") or {}).get("name"))
        c.check(scm is not None and sname in (scm.get("data") or {}), f"FilterCommand {script} is in a mounted ConfigMap")
        c.check((svol.get("configMap") or {}).get("defaultMode") == 0o755, "filter scripts mounted with mode 0755")
    elif cmd:
        c.check(True, f"FilterCommand {cmd} (not a mounted file)")

    # --- mounts: a subPath mount is a copy that never sees an update ---
    sub = [m["mountPath"] for m in ctr.get("volumeMounts") or []
           if ("subPath" in m or "subPathExpr" in m)
           and any(k in volumes.get(m["name"], {}) for k in ("configMap", "secret", "projected"))]
    c.check(not sub, f"no ConfigMap or Secret mounted with subPath {sub or ''}".rstrip())

    # --- hooks: reachable, their TLS material and token mounted so that updates arrive ---
    check_hooks(c, effective_settings(conf, env), ctr, pod, mounts, volumes)

    # --- TLS ---
    services = [d for d in docs if d.get("kind") == "Service"]
    check_tls(c, effective_settings(conf, env), expect, ctr,
              dict(pod, _labels=tmpl.get("metadata", {}).get("labels")), mounts, volumes, ports, services)

    # --- milters: reachable from the proxy, the quarantine writable ---
    check_milters(c, effective_settings(conf, env), ctr, pod, mounts, volumes)

    # --- shutdown ---
    pre = (ctr.get("lifecycle") or {}).get("preStop") or {}
    sleep = None
    if "sleep" in pre:
        sleep = int(pre["sleep"].get("seconds", 0))
    elif (pre.get("exec") or {}).get("command", [""])[0].endswith("sleep"):
        sleep = int(pre["exec"]["command"][1])
    c.check(sleep is not None and sleep > 0, f"preStop sleep ({sleep}s)")
    drain = int(conf.get("draintimeout", 30))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    c.check(grace >= (sleep or 0) + drain + 1,
            f"terminationGracePeriodSeconds {grace} >= preStop {sleep} + DrainTimeout {drain} + margin")

    # --- a config change reaches the proxy: reloaded in place, or the pods roll ---
    annotations = tmpl.get("metadata", {}).get("annotations") or {}
    checksum = annotations.get("checksum/config", "")
    cm_volumes = [v["configMap"]["name"] for v in volumes.values() if "configMap" in v]
    ours = [n for n in cm_volumes if n in configmaps]
    hashed = ours and all(re.search(r"-[a-z0-9]{10}$", n) for n in ours)
    reload_watch = str(effective_settings(conf, env).get("reloadwatch", "on")).lower() in ("on", "yes", "true", "1")
    how = ("ReloadWatch on: reloaded in place" if reload_watch else None) or \
          ("checksum/config annotation" if re.fullmatch(r"[0-9a-f]{64}", checksum) else None) or \
          ("kustomize hash-named ConfigMaps" if hashed else None)
    c.check(how is not None, f"a config or filter change reaches the proxy ({how or 'no reload, no roll'})")
    rendered_cm = any(d.get("kind") == "ConfigMap" and d["metadata"]["name"] in cm_volumes for d in docs)
    if rendered_cm and not hashed and "helm.sh/chart" in (tmpl.get("metadata", {}).get("labels") or {}):
        c.check(bool(re.fullmatch(r"[0-9a-f]{64}", annotations.get("checksum/restart-settings", "")
                                  or checksum)),
                "settings read once at start roll the pods (checksum/restart-settings or checksum/config)")

    # --- a persistent mail queue ---
    if queue:
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
        found_q = []
        for x in others:
            for m in x.get("volumeMounts") or []:
                if m.get("mountPath", "").rstrip("/") == queue:
                    v = volumes.get(m["name"])
                    kind = ("volumeClaimTemplate" if m["name"] in claims and v is None else
                            f"claim {(v or {}).get('persistentVolumeClaim', {}).get('claimName')}"
                            if "persistentVolumeClaim" in (v or {}) else None)
                    found_q.append((x["name"], m["name"], kind))
        c.check(bool(found_q) and all(k for _, _, k in found_q),
                f"the mail queue {queue} is persistent ({found_q or 'not mounted by a mail container'})")

    # --- resources ---
    res = ctr.get("resources") or {}
    c.check(all(k in (res.get("requests") or {}) for k in ("cpu", "memory")) and "memory" in (res.get("limits") or {}),
            "resources: cpu+memory requests, memory limit")

    # --- service ---
    labels = tmpl.get("metadata", {}).get("labels") or {}
    ok = False
    for s in (d for d in docs if d.get("kind") == "Service"):
        sel = s["spec"].get("selector") or {}
        if sel and all(labels.get(k) == v for k, v in sel.items()):
            if any(p.get("targetPort") in ("smtp", ports.get("smtp")) for p in s["spec"].get("ports") or []):
                ok = True
    c.check(ok, "a Service selects the pod and targets the proxy's smtp port")

    print(f"{c.label}: {c.count - c.failed} of {c.count} pod checks passed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
