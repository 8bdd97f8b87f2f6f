"""tasks.py: the task list users see, each task documented, and a failing precondition worded as a fix."""

from __future__ import annotations

import yaml
from support import ROOT, invoke


def test_list_shows_documented_tasks():
    listing = invoke("--list").stdout
    for name in ("data", "images.base", "test"):
        line = next((x for x in listing.splitlines() if x.strip().startswith(name + " ")), "")
        assert len(line.split()) > 2, f"{name} is missing or has no docstring:\n{listing}"


def test_data_task_validates_the_default_config():
    done = invoke("data")
    assert done.returncode == 0, done.stderr
    assert '"examples": 60' in done.stdout
    assert "training on the first 60 of 264 examples (data.limit)" in done.stderr


def test_data_task_fails_on_bad_config_with_the_fix():
    done = invoke("data", "--set", "train.rank=0")
    assert done.returncode == 2
    assert "--set train.rank=0: train.rank: input should be greater than 0 (got 0). Fix: use a value > 0" in done.stderr


def test_ci_workflow_runs_only_commands_the_readme_documents():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pipeline.yml").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert commands, "the workflow runs nothing"
    for command in commands:
        for part in command.split(" && "):
            assert part in readme, f"{part!r} is run by CI but not documented in README.md"
