#!/usr/bin/python3
"""How fast the configuration file parser is (not a test).

Run:  python3 tests/bench_config.py [--megabytes 1]

Issue 6 asks for a 1 MB file in well under a second (the old parser joined continuation
lines in quadratic time: 76 s for 3 MB, longer than the watchdog allows on reload). For
each shape of file it prints the size, the best of three parse times and the rate; the
last line checks that the time grows linearly (twice the size, about twice the time).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from macvlan_router import config  # noqa: E402


def shapes(size):
    """Files of about `size` characters that stress each state of the parser."""
    def repeat(unit, head="", tail=""):
        return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail
    return {
        "continuation lines": repeat("203.0.113.1 \\\n", "ADDITIONAL_ROUTES=", "\n"),
        "short assignments": repeat("MACVLAN_DOCKER_NETWORK=lan\n"),
        "comments": repeat("# a comment that runs on for a while; and on\n"),
        "comments ending in \\": repeat("# c \\\n\n"),
        "one double-quoted value": repeat("x \\\" \\$ y ", 'ADDITIONAL_ROUTES="', '"\n'),
        "one single-quoted value": repeat("x \\ y ", "ADDITIONAL_ROUTES='", "'\n"),
        "escapes outside quotes": repeat("\\x\\ ", "A=", "\n"),
    }


def best_of(text, runs=3):
    best = None
    for _ in range(runs):
        start = time.perf_counter()
        parsed = config.parse_environment_file(text, "bench")
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    assert not parsed.problems, parsed.problems[:1]
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.megabytes * 1_000_000)
    print(f"{'file shape':<26} {'bytes':>10} {'seconds':>9} {'MB/s':>7}")
    worst = 0.0
    for name, text in shapes(size).items():
        seconds = best_of(text)
        worst = max(worst, seconds)
        print(f"{name:<26} {len(text.encode()):>10} {seconds:>9.3f} "
              f"{len(text) / seconds / 1e6:>7.1f}")
    print(f"slowest {args.megabytes:g} MB file: {worst:.3f} s")
    single = best_of(shapes(size)["continuation lines"])
    double = best_of(shapes(2 * size)["continuation lines"])
    print(f"continuation lines, {2 * args.megabytes:g} MB / {args.megabytes:g} MB: "
          f"{double / single:.2f} times the time (linear: about 2)")


if __name__ == "__main__":
    main()
