import pytest
import torch

MEASURED: list[str] = []


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def report():
    """Record a measured figure; all of them are printed at the end of the run (never hard-coded)."""
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured in this run")
        for line in MEASURED:
            terminalreporter.write_line(line)
