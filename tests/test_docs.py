"""The configuration reference in docs/ is generated from the configs and must stay current."""

from pipeline import docs


def test_configuration_reference_is_current():
    assert docs.OUTPUT.read_text() == docs.render(), "docs/configuration.md is stale: run `python -m pipeline.docs`"


def test_every_option_has_a_default_and_a_meaning():
    undocumented = [row.split("|")[1].strip() for row in docs.render().splitlines() if row.endswith("|  |")]
    assert not undocumented, f"options without a comment in pipeline/config.py: {undocumented}"
