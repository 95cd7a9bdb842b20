"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -n 2 -q'
    assert f"    {test_command}\n" in readme
    assert f"\n{test_command}\n" in ci
    assert "    pip install torch==2.13.0 && pip install -e . && kgtok run\n" in readme


def test_readme_config_reference_is_current():
    from kgtok.docs import BEGIN, END, config_reference

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == config_reference().strip(), "run: python -m kgtok.docs --write"
    assert "| `gse.l1` |" in section and "| `r` | int | `64` |" in section and "| `tiny.hidden_size` |" in section
