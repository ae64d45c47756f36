"""The documentation's links: every relative link and #anchor in README.md, CHANGELOG.md and docs/*.md points at a file
or folder that exists and at a heading that exists (GitHub's anchor rules), and every page of docs/ is linked from the
README. Fenced code blocks and inline code are not Markdown, and their brackets are not links."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(os.path.join("docs", os.path.basename(p)) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = ["README.md", "CHANGELOG.md", *DOCS]
FENCED = re.compile(r"^(```|~~~).*?^\1[^\n]*$", flags=re.M | re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")


def prose(text: str) -> str:
    """The Markdown without its fenced code blocks and inline code spans."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", FENCED.sub("", text), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text (links as their text, no emphasis or code marks), lowercased,
    every character that is not a letter, digit, space, hyphen or underscore removed, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"\*\*|__|\*|`", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    """Every heading's anchor in the Markdown file at `path`; a repeated heading gets -1, -2, ... as on GitHub."""
    with open(path, encoding="utf-8") as f:
        text = FENCED.sub("", f.read())
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", text, flags=re.M):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def links(page: str, root: str = ROOT) -> list:
    """(target, the path it resolves to or None for the page itself, anchor) of every relative link on `page`."""
    with open(os.path.join(root, page), encoding="utf-8") as f:
        text = prose(f.read())
    found = []
    for _, target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...: not relative
            continue
        path, _, anchor = target.partition("#")
        found.append((target, os.path.normpath(os.path.join(root, os.path.dirname(page), path)) if path else None, anchor))
    return found


def broken_links(page: str, root: str = ROOT) -> list:
    """The links of `page` whose file, folder or heading does not exist, each with the reason."""
    broken = []
    for target, resolved, anchor in links(page, root):
        md = resolved or os.path.join(root, page)
        if not os.path.exists(md):
            broken.append(f"{target}: no such file or folder")
        elif anchor and not (md.endswith(".md") and os.path.isfile(md)):
            broken.append(f"{target}: an anchor into something that is not a Markdown file")
        elif anchor and anchor not in anchors(md):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {os.path.relpath(md, root)}")
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_exists(page):
    assert links(page), f"{page} has no relative links: the parser missed them"
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolved for _, resolved, _ in links("README.md") if resolved}
    assert DOCS, "no docs/*.md found"
    assert [page for page in DOCS if os.path.join(ROOT, page) not in linked] == []


def test_anchors_and_broken_links_follow_githubs_rules(tmp_path):
    """The parser on pages made for it: GitHub's anchors of headings with code, punctuation and repeats, and a link
    broken in each way the test can find, beside links that are fine or are not links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# FP3O on SMAC: `fp3o_smac.py`\n## Per-map settings (table E.5)\n## The headline command: SMAX 6h_vs_8z, no "
        "sharing\n## Results\n## Results\n```\n## not a heading\n```\n"
    )
    assert anchors(str(tmp_path / "docs" / "a.md")) == {
        "fp3o-on-smac-fp3o_smacpy",
        "per-map-settings-table-e5",
        "the-headline-command-smax-6h_vs_8z-no-sharing",
        "results",
        "results-1",
    }
    assert slug("[`docs/`](docs/) and **bold**") == "docs-and-bold"
    (tmp_path / "README.md").write_text(
        "# Top\n[ok](docs/a.md#results-1) [ok](#top) [ok](docs/) `[code](nowhere.md)` [web](https://example.org/x#y)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#result) [not markdown](docs/#x) [no heading](#bottom)\n"
        "```\n[in a block](nowhere.md)\n```\n~~~\n[in a tilde block](nowhere.md)\n~~~\n"
    )
    targets = [target for target, _, _ in links("README.md", str(tmp_path))]
    assert targets == ["docs/a.md#results-1", "#top", "docs/", "docs/b.md", "docs/a.md#result", "docs/#x", "#bottom"]
    broken = [reason.split(":")[0] for reason in broken_links("README.md", str(tmp_path))]
    assert broken == ["docs/b.md", "docs/a.md#result", "docs/#x", "#bottom"]
