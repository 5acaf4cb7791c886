"""The study and search keys are documented, and every documented `pretune compare|search` command validates."""

import re
import shlex

from pretune.run import build_task
from pretune.studies.compare import StudyConfig, load_study
from pretune.studies.search import SearchConfig, SpaceConfig, load_search
from tests.studies.conftest import ROOT


def test_study_and_search_keys_are_documented():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    keys = [*StudyConfig.model_fields, *(k for k in SearchConfig.model_fields if k != "space"),
            *(f"space.{k}" for k in SpaceConfig.model_fields)]
    assert not [k for k in keys if f"`{k}`" not in doc]


def documented():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = False
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if line.startswith("```"):
                fenced = not fenced
                continue
            match = re.search(r"pretune (compare|search) (\S+\.yaml.*)", line.split("#", 1)[0]) if fenced else None
            if match:
                yield doc.name, match.group(1), shlex.split(match.group(2))


def test_documented_commands_validate():
    commands = list(documented())
    assert {c for _, c, _ in commands} == {"compare", "search"} and len(commands) >= 5
    for doc, command, args in commands:
        load = load_study if command == "compare" else load_search
        try:
            build_task(load(ROOT / args[0], [a for a in args[1:] if "=" in a and not a.startswith("-")])[2])
        except Exception as exc:  # noqa: BLE001 - name the documented command that broke
            raise AssertionError(f"{doc}: pretune {command} {' '.join(args)} -> {exc}") from None
