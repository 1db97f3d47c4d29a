"""utils.precision thread settings: `auto` leaves the cores of other processes and of this run's
workers free; explicit values are checked and applied."""
import pytest
import torch

from utils import precision


@pytest.fixture
def machine(monkeypatch):
    """A machine with `cores` usable cores and a 1-minute load average of `load`."""
    def set_machine(cores, load):
        monkeypatch.setattr(precision.os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(precision.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_machine


def test_auto_threads_leaves_busy_cores_and_workers_free(machine, monkeypatch):
    machine(8, 0.3)
    assert precision.auto_threads() == 8
    assert precision.auto_threads(workers=2) == 6
    machine(8, 3.7)  # three cores busy elsewhere (rounded down: a fraction is not a whole core)
    assert precision.auto_threads(workers=2) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the rest
    assert precision.auto_threads(workers=0) == 2
    machine(2, 5.0)  # more load than cores: still one thread
    assert precision.auto_threads(workers=1) == 1


def test_set_threads_applies_and_checks(machine):
    before = torch.get_num_threads()
    try:
        machine(4, 1.2)
        assert precision.set_threads("auto", workers=1) == 2 and torch.get_num_threads() == 2
        assert precision.set_threads(1) == 1 and torch.get_num_threads() == 1
        for bad in (0, -1, "many", 1.5, True):
            with pytest.raises(ValueError, match="training.threads"):
                precision.set_threads(bad, key="training.threads")
    finally:
        torch.set_num_threads(before)
