"""The README and the docs: the set-up commands CI runs, the worked example, the generated config
reference, and every relative link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -n 2 -q'


def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    readme, ci = read("README.md"), read(".ci/run")
    assert f"    {TEST_COMMAND}\n" in readme
    assert f"\n{TEST_COMMAND}\n" in ci
    assert "    pip install torch==2.13.0 && pip install -e . && kgtok run\n" in readme


def test_ci_builds_the_docs_strictly_after_the_tests():
    ci = read(".ci/run")
    after = ci.split(f"\n{TEST_COMMAND}\n", 1)[1]
    assert 'pip install -e ".[docs]"' in after and "mkdocs build --strict" in after
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    docs_extra = tomllib.loads(read("pyproject.toml"))["project"]["optional-dependencies"]["docs"]
    assert {re.split(r"[<>=\[]", d)[0] for d in docs_extra} == {"mkdocs", "mkdocs-material", "mkdocstrings"}
    assert not any("torch" in d for d in docs_extra)


def test_readme_fits_two_screens():
    assert len(read("README.md").splitlines()) <= 150


def test_config_reference_is_current():
    from kgtok.docs import BEGIN, END, REFERENCE_PAGE, config_reference

    page = read(str(REFERENCE_PAGE))
    section = page.split(BEGIN, 1)[1].split(END, 1)[0]
    assert section.strip() == config_reference().strip(), "run: python -m kgtok.docs --write"
    assert "| `gse.l1` |" in section and "| `r` | int | `64` |" in section and "| `tiny.hidden_size` |" in section


# --- links -------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def without_code(text: str) -> str:
    """The text less fenced blocks, indented code blocks and inline code (their brackets are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs and, for plain headings, GitHub give a heading)."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", without_code(path.read_text(encoding="utf-8")))


def test_every_relative_link_resolves():
    checked, broken = 0, []
    for page in markdown_files():
        for target in links(page):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            checked += 1
            if not resolved.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no {resolved})")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor} in {resolved.name})")
    assert checked > 20 and not broken, "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) `[not](a-link.md)`\n\n    [code](x.md)\n")
    assert links(page) == ["#a-title", "missing.md"] and anchors(page) == {"a-title"}


def test_no_raw_html_tags_in_prose():
    """``<TAB>`` or ``<a_3>`` outside code would be read as HTML and vanish from the page."""
    found = [f"{page.relative_to(ROOT)}: {tag}" for page in markdown_files()
             for tag in re.findall(r"<[A-Za-z_/][^>\n]*>", without_code(page.read_text(encoding="utf-8")))]
    assert not found, found


def test_every_docs_page_is_in_the_nav():
    import yaml

    def pages(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for item in entry for p in pages(item)]
        return [p for value in entry.values() for p in pages(value)]

    nav = pages(yaml.safe_load(read("mkdocs.yml"))["nav"])
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == on_disk


# --- the README's worked example ---------------------------------------------------

FAST_RUN = ("embed.max_steps=60", "embed.eval_every=30", "embed.dim=16", "embed.threads=1", "text.mode=joint",
            "text.threads=1", "hierarchy.levels=3", "hierarchy.threads=1", "quantize.levels=3",
            "quantize.codebook_size=16", "quantize.epochs=4", "quantize.threads=1", "progress=false")


def readme_example() -> tuple[list[str], str]:
    """The README's UMLS example: its kgtok command lines and its Python block."""
    section = read("README.md").split("<!-- example:umls -->", 1)[1].split("<!-- example:umls-output -->", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    kgtok ")]
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    return commands, python


@pytest.mark.slow
def test_readme_worked_example_runs(tmp_path, monkeypatch, capsys):
    """The commands and the Python block, as written, on the shared UMLS (tiny sizes: FAST_RUN appended)."""
    from kgtok.cli import cli

    umls = str(shared_dataset("umls"))
    commands, python = readme_example()
    assert [c.split()[1] for c in commands] == ["data", "run", "report"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = command.replace("../shared/datasets/umls", umls).split()[1:]
        if args[0] == "run":
            args += FAST_RUN
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.output}"
        if args[0] == "data":
            assert "135" in result.output
    assert (tmp_path / "runs" / "umls" / "report.html").exists()
    capsys.readouterr()
    exec(compile(python.replace("../shared/datasets/umls", umls), "README.md example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert 1 <= len(printed) <= 5 and all(re.search(r"<a_\d+><b_\d+><c_\d+>", line) for line in printed)
    first_codes = {re.search(r"<a_\d+>", line).group() for line in printed}
    assert len(first_codes) == 1  # every printed concept shares entity 0's first code


def test_a_field_comment_continued_on_the_next_line_is_read_whole():
    """The reference cut such notes mid-sentence ("cuda =", "a code used by 0.1% of")."""
    from kgtok.docs import _comments
    from kgtok.hierarchy.config import HierarchyConfig
    from kgtok.quantize.config import QuantizeConfig

    assert _comments(QuantizeConfig)["dead_after"].endswith("with probability 1e-4)")
    assert _comments(HierarchyConfig)["device"].endswith("(other float sums: not a machine field)")
