"""Suite-wide settings: one CPU thread everywhere.

The suite's models are tiny, so one thread loses nothing on a quiet machine, and on a busy one it
keeps the suite from running several times slower (torch's threads wait for each other at every
operator when the cores are taken). Subprocesses (`torchrun`, `python -m gaborprune`) inherit it
through OMP_NUM_THREADS. The image-tree cache goes to a fresh temporary folder. The CPU's channel
block is pinned to AVX2's 8 (GABORPRUNE_CPU_BLOCK, inherited by subprocesses too), so that no
expectation depends on the host's CPU; tests of other blocks set theirs.
"""

import os
import tempfile

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["GABORPRUNE_CPU_BLOCK"] = "8"
# decoded image trees are cached here, never in the user's ~/.cache
os.environ["GABORPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gaborprune-test-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)


#: {test node id: its outcome} for the tests run so far in this session: the support table
#: (tests/test_support_table.py, run last) checks that the tests it cites passed.
OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        OUTCOMES[report.nodeid] = report.outcome


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_support_table.py"))  # stable: the rest keep their order
