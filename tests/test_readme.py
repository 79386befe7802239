"""The README against the tool: it names every option that --help lists and none that does not
exist, finds each recipe from its first screen, and its one-command demo runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import demo
import replicate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def options(parser: object) -> set[str]:
    return {option for action in parser._actions  # type: ignore[attr-defined]
            for option in action.option_strings if option.startswith("--")}


def test_the_readme_names_every_option_and_no_other() -> None:
    listed = options(replicate._setup_argparser())
    reference = README[README.index("### Options"):README.index("### The save file")]
    assert listed - set(OPTION.findall(reference)) == set()
    # anywhere in the README: the tool's options, or the demo's
    assert set(OPTION.findall(README)) - listed - options(demo._setup_argparser()) == set()


def test_each_recipe_is_found_from_the_first_screen() -> None:
    first = "\n".join(README.splitlines()[:60])
    headings = re.findall(r"(?m)^### (.+)$", README[README.index("## Recipes"):
                                                    README.index("## Reference")])
    assert len(headings) == 10
    for heading in headings:
        anchor = "#" + re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        assert f"]({anchor})" in first, heading


def test_help_ends_with_examples() -> None:
    text = replicate._setup_argparser().format_help()
    examples = text[text.index("examples:"):]
    assert examples.count("replicate.py http") >= 4


def test_the_demo_runs_in_one_command() -> None:
    answer = subprocess.run([sys.executable, str(ROOT / "tests" / "demo.py"), "--studies", "4"],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    out = answer.stdout
    for step in ("=== 1.", "=== 2.", "=== 3.", "=== 4.", "the new server holds every "
                 "instance of the old one", "removed both servers"):
        assert step in out, out[-3000:]
    assert "--- exit status 130" in out  # the interruption did interrupt


def test_the_alert_rules_and_the_scrape_block_load_in_prometheus(tmp_path: Path) -> None:
    """The watching recipe's YAML, as Prometheus' own checker reads it."""
    section = README[README.index("### Watching a long run"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)[:2]
    scrape, rules = blocks
    (tmp_path / "rules.yml").write_text(rules)
    (tmp_path / "prometheus.yml").write_text(f"{scrape}rule_files: [rules.yml]\n")
    answer = subprocess.run(["/usr/bin/promtool", "check", "config",
                             str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "4 rules found" in answer.stdout + answer.stderr
