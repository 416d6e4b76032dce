"""The operator references are generated from the code and must not fall behind it."""

from pathlib import Path

from config.reference import configuration_md, job_file_md

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_configuration_reference_is_current():
    assert (DOCS / "configuration.md").read_text() == configuration_md(), "run: python run.py docs"


def test_the_job_file_reference_is_current():
    assert (DOCS / "job-file.md").read_text() == job_file_md(), "run: python run.py docs"
