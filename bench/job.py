"""One job in a child process, so its peak memory (driver, Ray, workers) is measured alone:
`python -m bench.job SPEC_JSON [ADDRESS]` runs it and prints the RunSummary and wall time as
JSON."""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    t0 = time.perf_counter()
    from repscope.jobs.pipeline import run_job
    from repscope.jobs.spec import spec_from_dict

    spec = spec_from_dict(json.loads(sys.argv[1]))
    address = sys.argv[2] if len(sys.argv) > 2 else None
    summary = run_job(spec, address=address, overwrite=True, log=open(os.devnull, "w"))
    print(json.dumps({"summary": summary.to_dict(), "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
