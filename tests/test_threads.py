"""--threads: range-checked, applied before any work, and a warning when the machine is oversubscribed."""

import pytest
import torch

from gaborprune import _threads
from helpers import one_line_error, run

CORES = _threads.usable_cores()


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", [["inspect", "resnet20"], ["eval", "resnet20", "--data", "fake:8"],
                                     ["prune", "resnet20", "--dry-run"], ["demo"], ["reproduce", "vgg16-cifar10", "--data", "fake:8"]])
@pytest.mark.parametrize("threads", [0, -1, CORES + 1, 100000])
def test_thread_counts_outside_the_machine_are_refused(tmp_path, command, threads):
    one_line_error(run(*command, "--threads", threads, *(["--out", tmp_path] if command[0] in ("demo", "reproduce") else [])),
                   "--threads", f"from 1 to {CORES}", repr(threads))
    assert list(tmp_path.iterdir()) == []


def test_threads_are_applied_and_quiet_on_a_quiet_machine(monkeypatch):
    monkeypatch.setattr(_threads, "load_average", lambda: 0.0)
    result = run("inspect", "resnet20", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1 and "warning" not in result.stderr


@pytest.mark.skipif(CORES < 2, reason="needs two usable cores")
def test_an_oversubscribed_machine_gets_one_warning_line(monkeypatch):
    monkeypatch.setattr(_threads, "load_average", lambda: CORES + 1.5)
    result = run("inspect", "resnet20", "--threads", 2)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the machine is busy") and "--threads 1" in lines[0], result.stderr
    assert f"load {CORES + 1.5:.1f} on {CORES} cores" in lines[0]


def test_one_thread_never_warns(monkeypatch):
    monkeypatch.setattr(_threads, "load_average", lambda: 50.0)
    assert _threads.busy_warning(1) is None and _threads.busy_warning(2) is not None


def test_the_library_call_checks_too():
    from gaborprune.errors import GaborPruneError

    with pytest.raises(GaborPruneError, match="`threads` must be from 1"):
        _threads.set_threads(CORES + 1)
    assert _threads.set_threads(1) == 1 and _threads.set_threads(None) == 1
