"""The suite's own rules (tests/tiers.py): every test has exactly one tier, and a test
outside the slow tiers that spends too much CPU fails, however busy the machine is."""

import pytest

import tiers

pytestmark = pytest.mark.unit

#: spends about 1.5 s of CPU in a child process and 0.5 s in this one
BURNER = """
import subprocess, sys, time
import pytest

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

@pytest.mark.{tier}
def test_burns():
    subprocess.run([sys.executable, "-c", "import time\\nend = time.process_time() + 1.5\\n"
                    "while time.process_time() < end: pass"], check=True)
    burn(0.5)
"""


def run_inner(pytester, source: str, *args: str):
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess("-p", "tiers", "-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("tier", ["unit", "integration"])
def test_a_test_over_its_cpu_budget_fails_saying_how_much_it_spent(pytester, tier):
    result = run_inner(pytester, BURNER.format(tier=tier), "--cpu-budget=1")
    result.assert_outcomes(failed=1)
    spent = float(result.stdout.str().split(" spent ")[1].split(" s of CPU")[0])
    assert spent >= 1.9  # the child's CPU counts as well as this process's
    result.stdout.fnmatch_lines(["*spent * s of CPU in its call (the budget outside the *tiers is 1 s, 1.25 s with the allowance*"])


@pytest.mark.parametrize("tier", tiers.SLOW_TIERS)
def test_the_slow_tiers_may_take_what_they_need(pytester, tier):
    run_inner(pytester, BURNER.format(tier=tier), "--cpu-budget=1").assert_outcomes(passed=1)


def test_thirty_seconds_of_cpu_fail_under_the_default_budget(pytester, monkeypatch):
    """The default budget, without burning 30 s: the test's own CPU clock is read 30 s on."""
    monkeypatch.delenv(tiers.ENV, raising=False)
    source = """
import pytest
import tiers

@pytest.mark.integration
def test_thirty_seconds(monkeypatch):
    start = tiers.cpu_seconds()
    monkeypatch.setattr(tiers, "cpu_seconds", lambda: start + 30.0)
"""
    result = run_inner(pytester, source)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*spent 30.0 s of CPU in its call (the budget * is {tiers.BUDGET_S:g} s, *"])


def test_a_test_without_exactly_one_tier_stops_the_collection(pytester):
    source = """
import pytest

def test_no_tier():
    pass

@pytest.mark.unit
@pytest.mark.e2e
def test_two_tiers():
    pass
"""
    result = run_inner(pytester, source)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*2 test(s) not in exactly one tier*", "*test_no_tier: no tier",
                                 "*test_two_tiers: e2e, unit"])


def test_a_test_may_name_its_own_budget_and_why(pytester):
    source = BURNER.format(tier="integration").replace(
        "@pytest.mark.integration", '@pytest.mark.integration\n@pytest.mark.cpu_budget(5, reason="burns 2 s")')
    run_inner(pytester, source, "--cpu-budget=1").assert_outcomes(passed=1)


@pytest.mark.xdist_group("tiers")
def test_an_xdist_group_keeps_its_tests_on_one_worker(request):
    """Tests that share trained runs (trained_once) rely on their xdist_group running on one
    worker; pytest-xdist marks a group by a suffix of the test's node id, which pytest 9.2
    no longer takes (pytest-xdist issue 1386: the groups silently spread over the workers)."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by a pytest-xdist worker under --dist loadgroup (the README's pytest is)")
    assert request.node.nodeid.endswith("@tiers"), (
        f"{request.node.nodeid}: this pytest ({pytest.__version__}) drops xdist's group; use one that "
        "pyproject.toml's test extra allows")
