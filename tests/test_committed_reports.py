"""The committed reports under docs/ carry the discussion written for them.

A report whose folder has a hand-written ``discussion.md`` is regenerated with ``--from-results`` after
the discussion changes; a report that still ends with an older discussion states figures of another run.
"""
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
WITH_DISCUSSION = sorted(p.parent for p in DOCS.glob("*/discussion.md"))


def test_some_reports_have_discussions():
    assert len(WITH_DISCUSSION) >= 3, WITH_DISCUSSION


@pytest.mark.parametrize("folder", WITH_DISCUSSION, ids=lambda p: p.name)
def test_report_ends_with_its_discussion(folder):
    discussion = (folder / "discussion.md").read_text().strip()
    report = (folder / "report.md").read_text().strip()
    assert report.endswith(discussion), (
        f"{folder / 'report.md'} does not end with {folder.name}/discussion.md: regenerate it with the "
        f"script's --from-results {folder.relative_to(DOCS.parent)}")
