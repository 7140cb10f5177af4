"""pytest fixtures for the lab: `make_lab` (a factory) and `lab` (one lab, sized by the marker).

Loaded for the whole suite through `pytest_plugins` in the root conftest.py (keep this module's
name). Tests that use these fixtures carry `@pytest.mark.lab`, which the root conftest turns into
the root-and-namespaces prerequisite check; the fixtures also check for nft and nsenter. Every lab a
test makes is closed when the test ends, pass or fail, and a failing test's report shows the state
of its labs (hosts, cuts, programs, log files). Once per session, labs orphaned by aborted runs are
swept first. These fixtures must never close or sweep a lab that another live process owns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.lab import sweep
from tests.lab.lab import Lab
from tests.prereq import require_command, require_lab

_LABS = pytest.StashKey[list[Lab]]()
_swept = False


def _sweep_orphans_once() -> None:
    global _swept
    if _swept:
        return
    _swept = True
    report = sweep.sweep_labs()
    if report.failed:
        warnings.warn(f"lab sweeper could not remove every orphaned lab:\n{report}", stacklevel=2)


def _require_lab_tools() -> None:
    require_lab()
    require_command("nsenter", "util-linux")
    require_command("nft", "nftables")


@pytest.fixture
def make_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """A factory: `make_lab(hosts=3, mtu=1500)` returns a started Lab, closed after the test.

    Logs of programs started in the lab are kept under the test's tmp_path (lab1/, lab2/, ...).
    """
    _require_lab_tools()
    _sweep_orphans_once()
    labs: list[Lab] = []
    request.node.stash[_LABS] = labs

    def make(hosts: int | Sequence[str] = 3, *, mtu: int = 1500) -> Lab:
        lab = Lab(hosts, mtu=mtu, workdir=tmp_path / f"lab{len(labs) + 1}")
        labs.append(lab)
        return lab.start()

    yield make

    errors: list[Exception] = []
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("closing labs", errors)


@pytest.fixture
def lab(request: pytest.FixtureRequest, make_lab: Callable[..., Lab]) -> Lab:
    """One started lab; `@pytest.mark.lab(hosts=2, mtu=1400)` sizes it (default: 3 hosts, MTU 1500)."""
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker is not None else {}
    return make_lab(**options)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, object]:
    report = yield
    if isinstance(report, pytest.TestReport) and report.failed and call.when == "call":
        for lab in item.stash.get(_LABS, []):
            if lab.id:
                report.sections.append((f"lab {lab.id}", lab.describe()))
    return report
