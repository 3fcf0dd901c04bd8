"""Project files cite only what the repository holds: no design document, style guide or corpus
outside it, and every `docs/design.md §X.Y` they cite is a section of that document."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "design.md"
# Names of files that exist only outside the repository (assembled so this file does not match).
OUTSIDE = (
    "ALGORITHMS" + ".md",
    "STYLE" + ".md",
    "USER_" + "NEEDS",
    "../" + "shared",
    "/work/" + "shared",
)


def _project_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "pyproject.toml", DESIGN]
    for folder, pattern in (
        ("engram_jax", "*.py"),
        ("engram_jax", "*.md"),
        ("tests", "*.py"),
        ("launch", "*.sh"),
        ("colab", "*.ipynb"),
        ("docs", "*.md"),
    ):
        files += sorted((REPO / folder).rglob(pattern))
    return sorted(set(files))


def test_no_file_cites_a_file_outside_the_repository():
    offending = []
    for path in _project_files():
        text = path.read_text(encoding="utf-8")
        for name in OUTSIDE:
            for match in re.finditer(re.escape(name), text):
                line = text.count("\n", 0, match.start()) + 1
                offending.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offending, "citations of files outside the repository:\n" + "\n".join(offending)


def test_cited_design_sections_exist():
    text = DESIGN.read_text("utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    # §9's unverified choices are the numbered items of its list.
    unverified = text.split("## 9. ", 1)[1].split("\n## ", 1)[0]
    headings |= {f"9.{n}" for n in re.findall(r"^(\d+)\. ", unverified, re.M)}
    assert {"1.3", "1.5", "2.3", "2.6", "9", "9.1", "9.15", "10", "12"} <= headings
    missing = []
    for path in _project_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"docs/design\.md,? §(\d+(?:\.\d+)?)", text):
            if match.group(1) not in headings:
                missing.append(f"{path.relative_to(REPO)}: §{match.group(1)}")
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(missing)


def _design_headings() -> set[str]:
    text = DESIGN.read_text("utf-8")
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M))
    unverified = text.split("## 9. ", 1)[1].split("\n## ", 1)[0]
    return headings | {f"9.{n}" for n in re.findall(r"^(\d+)\. ", unverified, re.M)}


def test_every_section_sign_in_the_code_is_a_design_section():
    """Code and tests cite docs/design.md as a bare `§X.Y` too; each must exist there. A `§`
    right after a paper's name (`DeepSeek-V2 §2.1`, `V3 §2.1.1`) cites that paper instead."""
    headings = _design_headings()
    files = [p for p in _project_files() if p.suffix in (".py", ".sh", ".toml")]
    missing = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(\S*)\s?§(\d+(?:\.\d+)*)", text):
            if re.search(r"V\d+$", match.group(1)):
                continue  # a DeepSeek paper's section
            if match.group(2) not in headings:
                line = text.count("\n", 0, match.start()) + 1
                missing.append(f"{path.relative_to(REPO)}:{line}: §{match.group(2)}")
    assert not missing, "sections docs/design.md does not have:\n" + "\n".join(missing)
