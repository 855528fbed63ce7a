"""Test tiers, and the suite's own speed check.

Every test belongs to exactly one tier, named by one marker: on the test, or on its module
(`pytestmark`) where every test of the module shares it. `pytest -m quick` takes the unit
tier, `pytest -m "not slow"`
leaves out the slow tiers (e2e, dist, slurm, accuracy, compile).

The speed check: a test outside the slow tiers that spends more than its budget of CPU
time fails, saying how much it spent. CPU time, not wall time: a loaded machine stretches
a test's wall time but hardly its CPU time, so the check does not fire because the machine
is busy. It counts this process's CPU (every thread), that of the child processes it
waited for, and that of its live children with theirs (the fork server that starts a
launch's ranks), in the setup phase (the fixtures a test is first to need) and in the test
itself, each against the budget: 20 s (BUDGET_S), or --cpu-budget=S, or
BIGMODEL_TEST_CPU_BUDGET_S (0 turns the check off); a test that needs more says so, and
why, with @pytest.mark.cpu_budget(seconds, reason="..."). It fails a test only past the
budget times ALLOWANCE: CPU time drifts too on a shared machine (caches, memory bandwidth),
and a test near its budget should not fail one run in ten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = {
    "unit": "pure functions and objects: no training run, no command",
    "integration": "commands run in this process through the CLI's entry point, on tiny models",
    "e2e": "a real `bigmodel` process, for what only a process shows: signals, kill -9, exit codes, locks",
    "dist": "several ranks (gloo on CPU) under our launcher, torchrun or srun-like variables",
    "slurm": "a real Slurm cluster (CI starts a one-node one on loopback); skipped without one",
    "accuracy": "trains to an accuracy or loss target",
    "compile": "torch.compile's cold start (about 30 s of CPU a test)",
}
#: the tiers whose tests may take as long as the behaviour they show needs
SLOW_TIERS = ("e2e", "dist", "slurm", "accuracy", "compile")
BUDGET_S = 20.0
# A test fails past its budget times this (see above).
ALLOWANCE = 1.25
ENV = "BIGMODEL_TEST_CPU_BUDGET_S"


def pytest_configure(config):
    for tier, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {meaning}")
    config.addinivalue_line("markers", "quick: the unit tier, the check to run before each commit")
    config.addinivalue_line("markers", f"slow: any of the tiers {', '.join(SLOW_TIERS)}")
    config.addinivalue_line("markers", "cpu_budget(seconds, reason): this test's own CPU budget, and why it needs it")


def tiers_of(item: pytest.Item) -> list:
    return [m.name for m in item.iter_markers() if m.name in TIERS]


def tier_of(item: pytest.Item) -> str | None:
    tiers = tiers_of(item)
    return tiers[0] if len(tiers) == 1 else None


def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        tiers = tiers_of(item)
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
        elif tiers[0] == "unit":
            item.add_marker(pytest.mark.quick)
        elif tiers[0] in SLOW_TIERS:
            item.add_marker(pytest.mark.slow)
    if wrong:
        raise pytest.UsageError(f"{len(wrong)} test(s) not in exactly one tier; mark each (or its module) with one of "
                                f"{', '.join(TIERS)} (tests/tiers.py):\n" + "\n".join(wrong[:20]))


def pytest_addoption(parser):
    parser.addoption("--cpu-budget", type=float, default=None, metavar="S",
                     help=f"CPU seconds a test outside the slow tiers may spend (default {BUDGET_S:g}, or ${ENV}; "
                          "0: no check)")


def budget_s(config) -> float:
    given = config.getoption("--cpu-budget")
    if given is not None:
        return given
    value = os.environ.get(ENV, "")
    try:
        return float(value) if value else BUDGET_S
    except ValueError:
        raise pytest.UsageError(f"{ENV}={value!r} is not a number of seconds") from None


def cpu_seconds() -> float:
    """CPU seconds spent so far by this process, the children it has waited for, and its
    children still alive with theirs: a command that launches ranks in this process forks
    them from a fork server (engine/launch.py), which lives on and waits for them itself."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + live_children_cpu(os.getpid())


def live_children_cpu(pid: int) -> float:
    """utime, stime, cutime and cstime (/proc/PID/stat) of the live children of `pid`."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for children in Path(f"/proc/{pid}/task").glob("*/children"):  # each thread's children
        try:
            stats = [Path(f"/proc/{child}/stat").read_text() for child in children.read_text().split()]
        except OSError:  # gone meanwhile: its times are in os.times() once waited for
            continue
        for stat in stats:
            fields = stat.rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    spent = getattr(item, "_cpu_spent", {}).get(call.when)
    limit = budget_s(item.config)
    own = item.get_closest_marker("cpu_budget")
    if own is not None and limit > 0:  # a test that says why it needs more
        limit = max(limit, float(own.args[0]))
    if spent is None or not report.passed or limit <= 0 or tier_of(item) in SLOW_TIERS or spent <= limit * ALLOWANCE:
        return
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid} spent {spent:.1f} s of CPU in its {call.when} (the budget outside the "
                       f"{'/'.join(SLOW_TIERS)} tiers is {limit:g} s, {limit * ALLOWANCE:g} s with the allowance for a loaded "
                       "machine): make it smaller (fewer steps, a tinier "
                       "model, a shared trained fixture) or mark it with the tier it belongs to")


def _timed(item: pytest.Item, phase: str):
    start = cpu_seconds()
    yield
    spent = cpu_seconds() - start
    item.__dict__.setdefault("_cpu_spent", {})[phase] = spent
    # in --junitxml's report too, where the suite's cost is read test by test
    item.user_properties.append((f"cpu_s_{phase}", round(spent, 2)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    yield from _timed(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    yield from _timed(item, "call")
