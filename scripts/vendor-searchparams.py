#!/usr/bin/env python3
"""Regenerates fhir/searchparams/*.json.gz from ../shared/fhir/searchparams (official, CC0)."""
import gzip
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "..", "..", "shared", "fhir", "searchparams")
dst = os.path.join(here, "..", "fhir", "searchparams")
for v in ("r4", "r4b", "r5"):
    bundle = json.load(open(os.path.join(src, f"{v}-search-parameters.json")))
    out = []
    for e in bundle["entry"]:
        r = e["resource"]
        if r.get("resourceType") != "SearchParameter":
            continue
        item = {k: r[k] for k in ("code", "base", "type", "expression", "target", "comparator", "modifier") if k in r}
        item["url"] = r.get("url")
        out.append(item)
    with gzip.GzipFile(os.path.join(dst, f"{v}.json.gz"), "wb", mtime=0) as f:
        f.write(json.dumps(out, separators=(",", ":")).encode())
    print(v, len(out))
