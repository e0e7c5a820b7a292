"""pytest plugin (`-p ci_report`, `.ci` on PYTHONPATH): writes the run's outcome counts and the
node ids of skipped tests and modules as JSON to $BCJAX_CI_REPORT."""

import json
import os

_outcomes: dict[str, int] = {}
_skipped: list[str] = []


def _count(outcome: str) -> None:
    _outcomes[outcome] = _outcomes.get(outcome, 0) + 1


def pytest_collectreport(report):
    if report.skipped:  # a module-level importorskip: the whole file
        _count("skipped")
        _skipped.append(report.nodeid)
    elif report.failed:
        _count("error")


def pytest_runtest_logreport(report):
    if hasattr(report, "wasxfail"):
        _count("xfailed" if report.skipped else "xpassed")
    elif report.when == "call" and not report.skipped:
        _count("passed" if report.passed else "failed")
    elif report.skipped and report.when in ("setup", "call"):  # a fixture's or the test's own skip
        _count("skipped")
        _skipped.append(report.nodeid)
    elif report.failed and report.when != "call":
        _count("error")


def pytest_sessionfinish(session, exitstatus):
    with open(os.environ["BCJAX_CI_REPORT"], "w") as f:
        json.dump({"outcomes": _outcomes, "skipped": _skipped}, f, indent=1)
