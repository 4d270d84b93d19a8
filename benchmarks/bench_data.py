"""Load time of a CIFAR-shaped dataset: first (decoding every image of a tree) and cached.

Times `load_data(SPEC, (3, 32, 32))` `--repeats` times in fresh processes, into an empty cache folder
of its own, so the first run decodes and the later ones read the cache (for python batches both
read the batches). Prints the times and writes them with --json.

    .venv/bin/python benchmarks/bench_data.py cifar10:/work/data/cifar10-jpeg --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import time, torch
from gaborprune.data import load_data
torch.set_num_threads(1)
start = time.perf_counter()
train, test = load_data({spec!r}, (3, 32, 32))
print(time.perf_counter() - start, len(train), len(test))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"GABORPRUNE_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        runs = []
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD.format(spec=args.spec)], env=env, capture_output=True, text=True, check=True)
            seconds, train, test = out.stdout.split()
            runs.append(float(seconds))
            print(f"{'first' if i == 0 else 'cached'}: {float(seconds):.2f} s ({train} train / {test} test images)", flush=True)
    result = {"spec": args.spec, "first_seconds": runs[0], "cached_seconds": runs[1:], "load_average": os.getloadavg()[0],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
