"""`make bench`: every benchmark, one after another, each in its own process at the scale the machine
allows (CPU scale here; each module switches to its GPU configuration when CUDA is present). Each prints
ratios against a baseline measured in the same run; docs/<area>.md records the figures."""

from __future__ import annotations

import subprocess
import sys
import time

AREAS = ("data", "training", "serving", "reasoning", "operator")


def main() -> int:
    failed = []
    for number, area in enumerate(AREAS, 1):
        print(f"== [{number}/{len(AREAS)}] bench.{area}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.{area}"])
        print(f"== bench.{area}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        if code:
            failed.append(area)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
