"""Suite-wide settings: one CPU thread everywhere.

The suite's models are tiny, so one thread loses nothing on a quiet machine, and on a busy one it
keeps the suite from running several times slower (torch's threads wait for each other at every
operator when the cores are taken). Subprocesses (`torchrun`, `python -m gaborprune`) inherit it
through OMP_NUM_THREADS. The image-tree cache goes to a fresh temporary folder.
"""

import os
import tempfile

os.environ["OMP_NUM_THREADS"] = "1"
# decoded image trees are cached here, never in the user's ~/.cache
os.environ["GABORPRUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gaborprune-test-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)
