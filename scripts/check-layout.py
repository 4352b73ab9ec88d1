#!/usr/bin/env python3
"""Checks the layout rules of src/ (run by .ci/run):
1. `use crate::` imports between the top-level modules of src/ form no cycle;
2. no circle of files: file A naming file B (`crate::…`, `super::…`) and B, directly or
   not, naming A, where neither is the other's parent module (a parent re-exporting its
   child is not a circle);
3. no function outside tests is longer than 80 lines;
4. no source file is longer than 600 lines;
5. `fhir/` (the FHIR logic without I/O) imports nothing outside `fhir/`: the boundary a
   crate of its own would give, checked without a second crate (docs/architecture.md).
Prints what breaks a rule and exits 1; prints the module graph with -v."""
import os, re, sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
FN_LIMIT = 80
FILE_LIMIT = 600


def top_module(path):
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def rust_files():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(d, f)


def strip_tests(text):
    """Drops `#[cfg(test)] mod … { … }` blocks and `#[cfg(test)] mod …;` lines: tests may
    reach anywhere."""
    out, i = [], 0
    pattern = r"#\[cfg\(test\)\]\s*(#\[path[^\]]*\]\s*)?(pub(\(crate\))?\s+)?mod\s+\w+\s*(\{|;)"
    for m in re.finditer(pattern, text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        if m.group(4) == ";":
            i = m.end()
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def is_test_file(path):
    """A file that is only a test module (`#[path = "…_tests.rs"]`)."""
    return path.endswith("_tests.rs")


def imports():
    graph = defaultdict(set)
    for path in rust_files():
        me = top_module(path)
        if me in ("lib", "main") or is_test_file(path):
            continue
        text = strip_tests(open(path).read())
        for m in re.finditer(r"crate::(\w+)", text):
            other = m.group(1)
            is_module = os.path.exists(os.path.join(ROOT, other)) or os.path.exists(
                os.path.join(ROOT, other + ".rs"))
            if other != me and is_module:
                graph[me].add(other)
    return graph


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def module_path(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return () if rel in (["lib"], ["main"]) else tuple(rel)


def file_graph():
    """Edges between files (as module paths) that are not parent and child."""
    files = {module_path(p): p for p in rust_files() if not is_test_file(p)}

    def resolve(parts):
        for n in range(len(parts), 0, -1):
            if tuple(parts[:n]) in files:
                return tuple(parts[:n])
        return None

    graph = defaultdict(set)
    for me, path in files.items():
        text = re.sub(r"//[^\n]*", "", strip_tests(open(path).read()))
        targets = []
        for m in re.finditer(r"\b(crate|super)((?:::\w+)+)", text):
            base = [] if m.group(1) == "crate" else list(me[:-1])
            targets.append(base + m.group(2).split("::")[1:])
        for m in re.finditer(r"\b(crate|super)((?:::\w+)*)::\{([^}]*)\}", text):
            base = [] if m.group(1) == "crate" else list(me[:-1])
            head = m.group(2).split("::")[1:]
            for item in m.group(3).split(","):
                item = item.strip().split(" ")[0]
                if item and item != "self":
                    targets.append(base + head + item.split("::"))
        for parts in targets:
            t = resolve(parts)
            if t is None or t == me or t == me[: len(t)] or me == t[: len(me)]:
                continue
            graph[me].add(t)
    return graph


def long_functions():
    bad = []
    for path in rust_files():
        if is_test_file(path):
            continue
        lines = strip_tests(open(path).read()).split("\n")
        i = 0
        while i < len(lines):
            if re.match(r"\s*(pub(\([\w:]+\))?\s+)?(async\s+)?fn\s+\w+", lines[i]):
                name = re.search(r"fn\s+(\w+)", lines[i]).group(1)
                depth, j, opened = 0, i, False
                while j < len(lines):
                    # Braces inside string and char literals do not count.
                    code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j])
                    code = re.sub(r"'(\\.|[^'\\])'", "''", code).split("//")[0]
                    depth += code.count("{") - code.count("}")
                    opened = opened or "{" in code
                    if opened and depth <= 0:
                        break
                    if not opened and code.rstrip().endswith(";"):
                        break
                    j += 1
                n = j - i + 1
                if n > FN_LIMIT:
                    bad.append((os.path.relpath(path, os.path.join(ROOT, "..")), i + 1, name, n))
                i = j + 1
            else:
                i += 1
    return bad


def long_files():
    for path in rust_files():
        n = sum(1 for _ in open(path))
        if n > FILE_LIMIT:
            yield os.path.relpath(path, os.path.join(ROOT, "..")), n


# Top-level modules that must stay leaves of the import graph.
LEAVES = ("fhir",)


def main():
    graph = imports()
    if "-v" in sys.argv:
        for k in sorted(graph):
            print(f"{k} -> {', '.join(sorted(graph[k]))}")
    ok = True
    for c in cycles(graph):
        ok = False
        print("import cycle: " + " -> ".join(c))
    for c in cycles(file_graph()):
        ok = False
        print("circle of files: " + " -> ".join("/".join(m) for m in c))
    for leaf in LEAVES:
        for other in sorted(graph.get(leaf, ())):
            ok = False
            print(f"{leaf}/ imports crate::{other}: it must import nothing outside {leaf}/")
    for path, line, name, n in long_functions():
        ok = False
        print(f"{path}:{line}: fn {name} is {n} lines (limit {FN_LIMIT})")
    for path, n in long_files():
        ok = False
        print(f"{path}: {n} lines (limit {FILE_LIMIT})")
    sys.exit(0 if ok else 1)


main()
