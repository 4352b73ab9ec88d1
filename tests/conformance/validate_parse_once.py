#!/usr/bin/env python3
"""Runs ../shared/conformance/validate.py unchanged, with each FHIRPath expression parsed once.

Usage: validate_parse_once.py PATH/TO/validate.py [validate.py's arguments]

validate.py evaluates the same Bundle and SubscriptionStatus invariants on every Bundle with
`fhirpathpy.evaluate`, which parses the expression text again on each call: antlr in Python,
about 85% of its time (15 ms per Bundle; 3,000 Bundles took 50 s of one test). fhirpathpy's
own `compile` exists for exactly this case: parse once, apply to many resources. This wrapper
memoises `fhirpathpy.parse`, so every check still runs, on the same parse tree, and then
runs validate.py as `__main__` with its own exit status.

tests/conformance/check_parse_once.py runs both ways over the official examples, the
Bundles our tests receive and mutations of them that break each layer, and requires
identical reports; tests/it/conformance.rs runs it.
"""
import functools
import runpy
import sys

import fhirpathpy

fhirpathpy.parse = functools.lru_cache(maxsize=None)(fhirpathpy.parse)

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: validate_parse_once.py PATH/TO/validate.py [arguments]")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
