#!/usr/bin/env python3
"""The house rules the code keeps (issue 17): no library source file over 800 lines and no
function over 100 lines, tests aside (`#[cfg(test)]` modules and `tests.rs` files).
Prints every breach with its place and exits 1 on any."""
import os
import re
import sys

CRATES = ["mesh-core/src", "mesh-tower/src", "mesh-tonic/src", "mesh-control/src"]
MAX_FILE, MAX_FN = 800, 100
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
TEST_MOD = re.compile(r"\s*(pub(\(crate\))? )?mod \w+\s*\{")


def without_tests(lines):
    """The lines of a file with its inline `#[cfg(test)] mod x { .. }` blocks left out."""
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith("#[cfg(test)]") and i + 1 < len(lines):
            nxt = lines[i + 1]
            if TEST_MOD.match(nxt):
                depth, j = 0, i + 1
                while j < len(lines):
                    depth += lines[j].count("{") - lines[j].count("}")
                    if depth <= 0 and "{" in "".join(lines[i + 1 : j + 1]):
                        break
                    j += 1
                i = j + 1
                continue
            if re.match(r"\s*mod \w+;", nxt):
                i += 2
                continue
        out.append(lines[i])
        i += 1
    return out


def function_lengths(lines):
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            s = lines[j]
            if not started and ";" in s and "{" not in s:
                break  # a declaration without a body
            depth += s.count("{") - s.count("}")
            started = started or "{" in s
            if started and depth <= 0:
                yield m.group(6), i + 1, j - i + 1
                break


def main(root):
    breaches = []
    for crate in CRATES:
        for dirpath, _, files in os.walk(os.path.join(root, crate)):
            for f in sorted(files):
                if not f.endswith(".rs") or f == "tests.rs":
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    lines = without_tests(fh.read().split("\n"))
                if len(lines) > MAX_FILE:
                    breaches.append(f"{path}: {len(lines)} lines (max {MAX_FILE})")
                for name, line, length in function_lengths(lines):
                    if length > MAX_FN:
                        breaches.append(f"{path}:{line}: fn {name} is {length} lines (max {MAX_FN})")
    for b in breaches:
        print(b)
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
