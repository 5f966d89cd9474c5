"""The README's quickstart and CI must agree: CI runs exactly the test command the README shows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no quickstart code block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_two_commands_demo_and_tests():
    demo, tests = quickstart_commands()
    assert "constraints-cpu.txt" in demo and demo.endswith("weakseg demo")
    assert "constraints-cpu.txt" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = quickstart_commands()
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_constraints_pin_the_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text()
