"""The README and docs/: every relative link resolves, the README stays short, no path of a particular machine
appears, and the README's first two shell blocks are the set-up commands (.ci/run runs the second one)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) or [text](target "title")
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```$", re.M | re.S)  # the blocks .ci/run counts


def relative_links(text: str) -> list[str]:
    """Link targets that name a file of this repository: no URL, mailto or pure #anchor; #anchor suffixes dropped."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(page: pathlib.Path) -> list[str]:
    return [t for t in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / t).exists()]


def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.md", "GUIDE.md", "RESULTS.md", "ARCHITECTURE.md", "VLLM.md", "RELIABILITY.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_link_checker_sees_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "A.md").write_text("x")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/A.md#top) [b](docs/B.md) [c](https://example.com/x.md) [d](#here) [e](mailto:a@b.c)")
    assert broken_links(page) == ["docs/B.md"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 220, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_paths_of_one_machine(page):
    text = page.read_text(encoding="utf-8")
    assert "/work/" not in text and "/root/" not in text


def test_the_first_two_shell_blocks_are_the_set_up_commands():
    blocks = SHELL_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "README.md needs the two set-up commands as its first two ```bash blocks"
    assert "qvlquant quantize" in blocks[0]
    assert "pytest" in blocks[1] and "pip install" in blocks[1]
