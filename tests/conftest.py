import pytest
import torch


GPU_SKIP_REASON = "needs a CUDA GPU; none is available here"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """Each test starts with a clean dynamo cache so recompile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """At the end of a run: how many tests were skipped and why, GPU tests first (a CPU run skips them all)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    terminalreporter.section("skipped tests")
    gpu = reasons.pop(GPU_SKIP_REASON, 0)
    if gpu:
        terminalreporter.write_line(f"{gpu} GPU test(s) skipped: {GPU_SKIP_REASON} (on a CUDA machine: pytest -m gpu)")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{n} skipped: {reason}")
