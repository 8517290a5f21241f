"""Item 1: the README opens with the two set-up commands, and CI runs the README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_demo_and_test_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert text.index("```bash") < 20  # the very first thing after the title
    for command in commands:
        script = ROOT / command.split()[1]
        assert script.exists() and "env.sh" in script.read_text()


def test_ci_runs_the_readme_test_command_with_pinned_torch():
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    env = (ROOT / "scripts" / "env.sh").read_text()
    assert "-c constraints.txt" in env and "venv" in env
