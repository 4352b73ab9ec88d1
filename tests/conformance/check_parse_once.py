#!/usr/bin/env python3
"""Shows that validate_parse_once.py gives exactly validate.py's reports.

Usage: check_parse_once.py PYTHON_R5 PYTHON_R4 PATH/TO/validate.py [EXTRA.jsonl ...]

For each version (r5, r4b, r4) it feeds validate.py the official notification examples of
that version plus seeded mutations of them that break each layer (Bundle type, total,
search, fullUrl duplicates, entry order, request methods, status codes, event numbering,
missing elements), then runs validate.py directly and through the wrapper with `--json`
and `--sequence strict`, and requires the same output and exit status. EXTRA files (JSON
lines of R5 Bundles, e.g. ones a test received) are checked as R5 too. It prints how many
reports it compared and how many of them failed, by layer, so a run that compared nothing,
or no failure of the FHIRPath layer, is visible; it exits 1 when any output differs or
when the corpus did not exercise failing invariants.
"""
import copy
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
WRAPPER = os.path.join(HERE, "validate_parse_once.py")
DIRS = {"r5": ["r5"], "r4b": ["r4b-core", "r4b-backport"], "r4": ["r4-backport"]}


def examples(validate_py, fhir):
    root = os.path.join(os.path.dirname(validate_py), "examples")
    out = []
    for d in DIRS[fhir]:
        path = os.path.join(root, d)
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    doc = json.load(f)
                if doc.get("resourceType") == "Bundle":
                    out.append(doc)
    return out


def leaf_paths(node, prefix=()):
    """Every (path) to a dict key or list index below node."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from leaf_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from leaf_paths(v, prefix + (i,))


def drop(doc, path):
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]


def mutations(doc, rnd):
    """Copies of doc, each broken in one way (some still valid: that is fine)."""
    entries = doc.get("entry") or []
    out = []

    def m(f):
        d = copy.deepcopy(doc)
        try:
            f(d)
        except (KeyError, IndexError, TypeError):
            return
        out.append(d)

    m(lambda d: d.__setitem__("type", rnd.choice(["history", "searchset", "collection", "message", "batch", "x"])))
    m(lambda d: d.__setitem__("total", 3))
    m(lambda d: d["entry"][-1].__setitem__("search", {"mode": "match"}))
    m(lambda d: d["entry"].append(copy.deepcopy(d["entry"][-1])))
    m(lambda d: d["entry"].reverse())
    m(lambda d: d["entry"][0].__setitem__("request", {"method": rnd.choice(["PATCH", "POST", "GET", "FOO"]), "url": "x"}))
    m(lambda d: d["entry"][-1].__setitem__("response", {"status": "200"}))
    m(lambda d: d["entry"][-1].pop("fullUrl"))
    m(lambda d: d["entry"][0]["resource"].__setitem__("type", rnd.choice(["heartbeat", "query-event", "nonsense"])))
    m(lambda d: d["entry"][0]["resource"].__setitem__("status", rnd.choice(["off", "error", "bogus"])))
    m(lambda d: d["entry"][0]["resource"].__setitem__("eventsSinceSubscriptionStart", rnd.choice(["x", "-3", 7])))
    m(lambda d: d["entry"][0]["resource"].pop("notificationEvent"))
    m(lambda d: d["entry"][0]["resource"]["notificationEvent"][0].__setitem__("eventNumber", str(rnd.randint(0, 9))))
    m(lambda d: d["entry"][0]["resource"].__setitem__("error", [{"text": "e"}]))
    paths = list(leaf_paths(doc))
    for path in rnd.sample(paths, min(len(paths), 6)):
        m(lambda d, p=path: drop(d, p))
    if entries:
        out.append({"resourceType": "Bundle", "type": doc.get("type"), "entry": []})
    return out


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VALIDATE_PY_NO_REEXEC": "1"})
    return p.returncode, p.stdout, p.stderr


def compare(python, validate_py, fhir, docs):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
        path = f.name
    try:
        args = ["--fhir", fhir, "--json", "--sequence", "strict", path]
        direct = run([python, validate_py] + args)
        cached = run([python, WRAPPER, validate_py] + args)
    finally:
        os.unlink(path)
    if direct != cached:
        sys.stderr.write(f"{fhir}: outputs differ\n--- validate.py\n{direct}\n--- parse once\n{cached}\n")
        return None
    reports = [json.loads(line) for line in direct[1].splitlines() if line.startswith("{")]
    if len(reports) != len(docs):
        sys.stderr.write(f"{fhir}: {len(reports)} reports for {len(docs)} inputs\n{direct[2]}\n")
        return None
    return reports


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    py5, py4, validate_py, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    rnd = random.Random(20261203)
    layers, compared, failed = {}, 0, 0
    for fhir in ("r5", "r4b", "r4"):
        docs = []
        for doc in examples(validate_py, fhir):
            docs.append(doc)
            docs.extend(mutations(doc, rnd))
        if fhir == "r5":
            for path in extra:
                with open(path, encoding="utf-8") as f:
                    docs.extend(json.loads(line) for line in f if line.strip())
        reports = compare(py4 if fhir == "r4" else py5, validate_py, fhir, docs)
        if reports is None:
            return 1
        compared += len(reports)
        for r in reports:
            failed += not r["ok"]
            for e in r["errors"]:
                layer = e.split("]")[0].lstrip("[")
                layers[layer] = layers.get(layer, 0) + 1
    print(f"compared {compared} reports, identical; {failed} failed; errors by layer: {json.dumps(layers, sort_keys=True)}")
    if not compared or not layers.get("invariant"):
        sys.stderr.write("the corpus broke no FHIRPath invariant: it proves nothing about the cache\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
