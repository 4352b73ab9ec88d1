#!/usr/bin/env python3
"""Checks two layout rules of src/ (run by .ci/run):
1. `use crate::` imports between the top-level modules of src/ form no cycle;
2. no function in src/capture, src/delivery or src/api is longer than 80 lines.
Prints what breaks a rule and exits 1; prints the module graph with -v."""
import os, re, sys
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
LIMIT = 80
STAGED = ("capture", "delivery", "api")

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
    """Drops `#[cfg(test)] mod ... { ... }` blocks: tests may reach anywhere."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)

def imports():
    graph = defaultdict(set)
    for path in rust_files():
        me = top_module(path)
        if me in ("lib", "main"):
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

def long_functions():
    bad = []
    for path in rust_files():
        if top_module(path) not in STAGED:
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
                if n > LIMIT:
                    bad.append((os.path.relpath(path, os.path.join(ROOT, "..")), i + 1, name, n))
                i = j + 1
            else:
                i += 1
    return bad

def main():
    graph = imports()
    if "-v" in sys.argv:
        for k in sorted(graph):
            print(f"{k} -> {', '.join(sorted(graph[k]))}")
    ok = True
    for c in cycles(graph):
        ok = False
        print("import cycle: " + " -> ".join(c))
    for path, line, name, n in long_functions():
        ok = False
        print(f"{path}:{line}: fn {name} is {n} lines (limit {LIMIT})")
    sys.exit(0 if ok else 1)

main()
