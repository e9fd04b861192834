#!/usr/bin/env python3
"""Checks the shape of src/: no import cycle between files or between folders, and the
protocol folder stays sans-IO (no tokio, no files, no sockets).

A reference is any `crate::a::b` or `super::x` path in a file's code (not its comments, not
its `#[cfg(test)]` module): it is taken as an edge from the file to the module it names.
Exit status 1 and a report when a rule is broken.
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
# What the protocol folder must not use: it takes bytes and gives back values and actions.
SANS_IO_FORBIDDEN = re.compile(r"\btokio\b|\bstd::fs\b|\bstd::net::(Tcp|Udp)|\bUnixStream\b|\bstd::process\b")


def module_of(path: Path) -> tuple:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def code_of(text: str) -> str:
    """The file without comments and without its test module."""
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))?\s+)?mod tests", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//.*", "", text)
    return text


def expand_braces(path: str) -> list:
    """`a::{b, c::d}` -> [`a::b`, `a::c::d`] (one level is enough for a module name)."""
    m = re.match(r"(.*?)::\{(.*)\}", path, re.S)
    if not m:
        return [path]
    head, body = m.group(1), m.group(2)
    out, depth, item = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(item.strip())
            item = ""
        else:
            item += ch
    if item.strip():
        out.append(item.strip())
    return [f"{head}::{i}" for i in out if i and i != "self"] + [head]


def main() -> int:
    files = {module_of(p): p for p in SRC.rglob("*.rs")}
    modules = set(files)
    edges = {m: set() for m in modules}
    problems = []
    path_re = re.compile(r"\b(crate|super)((?:::\{[^;]*?\}|::[A-Za-z_][A-Za-z0-9_]*)+)")
    for module, path in files.items():
        code = code_of(path.read_text())
        is_dir_module = path.name == "mod.rs"
        for m in path_re.finditer(code):
            for full in expand_braces(m.group(0)):
                segs = [s for s in full.split("::") if s]
                if segs[0] == "crate":
                    base, rest = (), segs[1:]
                else:
                    # Each `super` goes one module up (a folder's mod.rs is the folder).
                    parent = module
                    while segs and segs[0] == "super":
                        segs = segs[1:]
                        parent = parent[:-1]
                    base, rest = parent, segs
                target = base
                for seg in rest:
                    if target + (seg,) in modules:
                        target = target + (seg,)
                    else:
                        break
                if target and target != module and target in modules:
                    # A folder's mod.rs naming its own children is a declaration, not a use.
                    if not (is_dir_module and target[: len(module)] == module):
                        edges[module].add(target)
        if module[:1] == ("protocol",):
            for line in code.splitlines():
                if SANS_IO_FORBIDDEN.search(line):
                    problems.append(f"{path.relative_to(SRC.parent)}: not sans-IO: {line.strip()}")

    def cycles(graph):
        index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)

        sys.setrecursionlimit(10000)
        for v in list(graph):
            if v not in index:
                visit(v)
        return out

    if "-v" in sys.argv:
        for a in sorted(edges):
            print("::".join(a), "->", ", ".join(sorted("::".join(b) for b in edges[a])))
    for comp in cycles(edges):
        names = sorted("::".join(m) for m in comp)
        problems.append("import cycle between files: " + ", ".join(names))
    folders = {}
    for a, targets in edges.items():
        for b in targets:
            if a[:1] != b[:1] and len(a) > 1 and len(b) >= 1:
                folders.setdefault(a[0], set()).add(b[0])
    for comp in cycles(folders):
        problems.append("import cycle between folders: " + ", ".join(sorted(comp)))
    for p in problems:
        print(p)
    if not problems:
        n_edges = sum(len(t) for t in edges.values())
        print(f"check-imports: {len(modules)} modules, {n_edges} imports, no cycle; protocol/ is sans-IO")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
