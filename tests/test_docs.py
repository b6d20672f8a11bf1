"""The documentation executes and its links resolve.

Every ```python block of README.md and docs/*.md runs, in a fresh namespace in a temporary
directory. A deliberate fragment is marked ```python notest and says so on its first line
(``# fragment: ...``), so a reader sees it is not meant to run; any other Python info string is
an error, so a block can be neither silently skipped nor silently broken. Relative links (and
their #anchors) in the same files must resolve, and docs/api.md names every public name of
``rela_kernels``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import rela_kernels as rk

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>.*)$")
PYTHON_INFO = re.compile(r"^(python3?|py|pycon|ipython)\b", re.IGNORECASE)


class Block(NamedTuple):
    page: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, start, body = match["fence"], i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(match["indent"]) :])
            i += 1
        found.append(Block(page, start + 1, match["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if PYTHON_INFO.match(b.info)]


def test_the_pages_have_python_blocks() -> None:
    runnable = [b for b in PYTHON_BLOCKS if b.info == "python"]
    assert len(runnable) >= 5
    assert any(b.page.name == "README.md" for b in runnable)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.name)
def test_python_block(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    if block.info == "python notest":
        first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
        assert first.startswith("# fragment"), (
            f"{block.name}: a ```python notest block must start with '# fragment: why'"
        )
        return
    assert block.info == "python", (
        f"{block.name}: info string {block.info!r}; use ```python (it runs in make test) or "
        "```python notest (a fragment, first line '# fragment: ...')"
    )
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        exec(compile(block.code, block.name, "exec"), {"__name__": "__doc_block__"})
    finally:
        torch.set_num_threads(threads)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code, found = False, set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#{1,6} (.+)$", line)):
            found.add(_slug(match[1]))
    return found


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # not in code
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert broken == [], f"{page.name}: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](missing.md) [anchor](#nowhere)\n")
    assert links(page) == ["#title", "missing.md", "#nowhere"]
    assert anchors(page) == {"title"}


def test_api_page_names_every_public_name() -> None:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in rk.__all__ if f"### `rk.{name}`" not in text]
    assert missing == []


# User pages speak of the project only: how it was made (numbered issues, working sessions,
# borrowed machines and their time limits, other jobs on a machine, machine-specific paths)
# belongs in CHANGELOG.md or the commit history, not in README.md or docs/.
PROCESS_WORDS = {
    "a numbered issue": re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE),
    "an issue's targets or rule": re.compile(
        r"\b(the|this|that|an?) issue(?:'s)?\b", re.IGNORECASE
    ),
    "a working session": re.compile(r"\bsessions?\b", re.IGNORECASE),
    "a lent machine": re.compile(r"\blent\b", re.IGNORECASE),
    "a lease": re.compile(r"\bleases?\b", re.IGNORECASE),
    "a machine path": re.compile(r"/work/"),
    "other jobs on the machine": re.compile(
        r"\bother (jobs|sessions|processes|runs)\b.{0,40}\b(shar|ran|load|core)", re.IGNORECASE
    ),
    "a changelog line": re.compile(
        r"\b(before this (issue|change)|until now|used to be)\b", re.IGNORECASE
    ),
}


def process_words(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in PROCESS_WORDS.items():
            if (match := pattern.search(line)) is not None:
                found.append(f"line {number}: {what}: {match[0]!r}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_pages_speak_of_the_project_only(page: Path) -> None:
    assert process_words(page.read_text(encoding="utf-8")) == [], page.name


def test_the_process_word_check_sees_each_kind() -> None:
    text = (
        "issue 12's study\nagainst the issue's targets\nthe third did not fit in the session\n"
        "the lent GPU machines\na 15-minute lease\n--out /work/sw\n"
        "while other jobs shared the cores\nlabelled AMD EPYC until now\n"
    )
    kinds = {line.split(": ")[1] for line in process_words(text)}
    assert kinds == set(PROCESS_WORDS)
    assert process_words("Issues and pull requests are welcome on the tracker.") == []


def test_the_project_files_exist() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert "Efficiency for Free: Ideal Data Are Transportable Representations" in citation
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog


# docs/api.md's reference entries spell out signatures (`rk.name(a, b=1, *, c=None)`); each one
# must be the real signature: the same parameters, in order, of the same kind, with the same
# defaults.
SIGNATURE = re.compile(r"`(rk\.[A-Za-z_][\w.]*)\(([^`]*)\)`")


def documented_signatures() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    reference = text[text.index("## Reference: every public name") :]
    return SIGNATURE.findall(" ".join(reference.split()))


def _documented_parameters(name: str, params: str) -> list[tuple[str, str, str | None]]:
    import ast

    tree = ast.parse(f"def f({params}): pass")
    args = tree.body[0].args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    found = [(a.arg, "positional", d) for a, d in zip(positional, defaults, strict=True)]
    found += [(a.arg, "keyword", d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    return [(n, kind, None if d is None else ast.unparse(d)) for n, kind, d in found]


def _real_parameters(obj) -> list[tuple[str, str, str | None]]:
    import dataclasses
    import inspect

    factories = {}  # a dataclass field's default_factory: its value is the default
    if dataclasses.is_dataclass(obj):
        factories = {
            f.name: f.default_factory
            for f in dataclasses.fields(obj)
            if f.default_factory is not dataclasses.MISSING
        }
    found = []
    for p in inspect.signature(obj).parameters.values():
        kind = "keyword" if p.kind is p.KEYWORD_ONLY else "positional"
        if p.name in factories:
            default = repr(factories[p.name]())
        elif p.default is p.empty:
            default = None
        elif isinstance(p.default, torch.dtype):
            default = str(p.default)
        else:
            default = repr(p.default)
        found.append((p.name, kind, default))
    return found


def _as_value(default: str | None) -> str | None:
    """A documented default as the repr of its value where it is a literal (1e-8 -> 1e-08)."""
    import ast

    try:
        return repr(ast.literal_eval(default)) if default is not None else None
    except ValueError:
        return default  # a name such as torch.float64


def test_api_page_signatures_are_the_real_ones() -> None:
    documented = documented_signatures()
    assert len(documented) >= 15
    wrong = []
    for name, params in documented:
        obj = rk
        for part in name.split(".")[1:]:
            obj = getattr(obj, part)
        doc = _documented_parameters(name, params)
        doc = [(n, k, _as_value(d)) for n, k, d in doc]
        if doc != _real_parameters(obj):
            wrong.append(f"{name}: documented {doc}, real {_real_parameters(obj)}")
    assert wrong == []


def test_the_signature_check_sees_a_wrong_entry() -> None:
    assert _documented_parameters("f", "a, b=1, *, c=None") == [
        ("a", "positional", None),
        ("b", "positional", "1"),
        ("c", "keyword", "None"),
    ]
    wrong = _documented_parameters("f", "scores, k, largest=True")  # largest is keyword-only
    assert _real_parameters(rk.select_topk)[:3] != wrong
