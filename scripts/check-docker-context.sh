#!/usr/bin/env bash
# Checks that docker/Dockerfile builds from this repository without a Docker engine:
# assembles exactly the files its build stage COPYs (honouring .dockerignore) into a temp
# dir and runs `cargo build --locked --bin fhir-cdc` there, sharing this checkout's target dir
# so it costs little: the dependencies are the ones .ci/run's test build compiled just before
# (a release-profile build compiled every dependency again, 3.5 minutes of a cold CI run).
# Which files the build needs does not depend on the profile. Also checks that what the
# runtime stage copies exists and that the config file its CMD names is in it and loads.
# Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

python3 - "$repo" "$ctx" <<'PY'
import fnmatch, json, os, shlex, shutil, sys
repo, ctx = sys.argv[1], sys.argv[2]

rules = []
for line in open(os.path.join(repo, ".dockerignore")):
    line = line.strip()
    if line and not line.startswith("#"):
        rules.append(line.rstrip("/"))

def ignored(rel):
    parts = rel.split("/")
    for r in rules:
        neg = r.startswith("!")
        pat = r[1:] if neg else r
        # A rule matches the path or any directory above it (Docker's semantics for dirs).
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1))
        if pat.startswith("**/"):
            hit = hit or fnmatch.fnmatch(parts[-1], pat[3:])
        if hit:
            return not neg
    return False

def copy(src, dst):
    path = os.path.join(repo, src)
    if not os.path.exists(path):
        sys.exit(f"docker/Dockerfile copies {src}, which does not exist")
    if ignored(src):
        sys.exit(f"docker/Dockerfile copies {src}, which .dockerignore excludes")
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), repo)
                if ignored(rel):
                    continue
                out = os.path.join(dst, os.path.relpath(rel, src))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(os.path.join(repo, rel), out)
    else:
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copy2(path, dst)

stage, workdir, copied, runtime = 0, "/", 0, []
cmd = None
for raw in open(os.path.join(repo, "docker/Dockerfile")):
    line = raw.strip()
    if not line or line.startswith("#"):
        continue
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "FROM":
        stage += 1
    elif word == "WORKDIR" and stage == 1:
        workdir = rest.strip()
    elif word == "COPY" and "--from=" not in rest:
        args = shlex.split(rest)
        *srcs, dst = args
        if stage == 1:
            base = os.path.join(ctx, os.path.relpath(os.path.join(workdir, dst), workdir))
            for s in srcs:
                target = base if len(srcs) == 1 and not dst.endswith("/") else os.path.join(base, os.path.basename(s))
                copy(s, target)
                copied += 1
        else:
            runtime.append((srcs, dst))
    elif word == "CMD":
        cmd = json.loads(rest)
if copied == 0:
    sys.exit("docker/Dockerfile: no COPY in the build stage")
# The runtime stage: its sources exist, and the --config file of CMD is among them.
config = cmd[cmd.index("--config") + 1] if cmd and "--config" in cmd else None
found = config is None
for srcs, dst in runtime:
    for s in srcs:
        if not os.path.exists(os.path.join(repo, s)) or ignored(s):
            sys.exit(f"docker/Dockerfile (runtime stage) copies {s}, missing or ignored")
        if config and config.startswith(dst.rstrip("/") + "/"):
            rel = config[len(dst.rstrip("/")) + 1:]
            if os.path.exists(os.path.join(repo, s, rel)):
                found = os.path.join(repo, s, rel)
if not found:
    sys.exit(f"docker/Dockerfile: CMD names {config}, which no COPY provides")
print(f"check-docker-context: {copied} COPY sources assembled in {ctx}")
PY

# The build stage's build, on exactly those files.
(cd "$ctx" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}" cargo build --locked --quiet --bin fhir-cdc)
# (The config files under config/ are loaded by tests/it/examples.rs.)
echo "check-docker-context: ok"
