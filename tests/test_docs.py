"""The README stays a user's page: short, with working links and two commands first."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300, "README.md is for users; move measurements to docs/benchmarks.md"
    for doc in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "design.md"):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_readme_starts_with_the_run_and_test_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "examples/train_tiny_lm.py" in commands[0]
    assert "scripts/run_tests.sh" in commands[1]
