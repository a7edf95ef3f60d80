"""What the code and docs point at: nothing outside the repository (the papers' text files, design notes that
are not in it, /tmp files, ``../shared``) and no issue numbers; papers are cited by title and arXiv id, and the
README cites every paper the project implements."""

import re
import subprocess

import pytest

FORBIDDEN = re.compile(
    r"DESIGN\.md|STYLE\.md|shared/papers|\.\./shared|\b(mage|bone-soups|wrpo)\.txt\b|/tmp/formats|"
    r"\bissues? ?#?\d+\b",
    re.IGNORECASE,
)
"""References to files outside the repository, and to issue numbers."""

PAPERS = {
    "MAGE": "2510.03782",
    "Bone Soups": "2502.10762",
    "WRPO": "2412.03187",
    "Rewarded soups": "2306.04488",
    "MOD": "2406.18853",
    "RiC": "2402.10207",
    "MODPO": "2310.03708",
    "GenARM": "2410.08193",
    "PARM": "2505.06274",
}
"""The papers the project implements or compares against, with their arXiv ids."""


def _tracked(repo_root) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True)
    return [
        f
        for f in out.stdout.splitlines()
        if f.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt"))
    ]


def test_no_reference_outside_the_repository_or_to_issue_numbers(repo_root):
    hits = []
    for f in _tracked(repo_root):
        if f == "tests/test_docs.py":
            continue  # the patterns themselves
        path = repo_root / f
        if path.is_symlink() or not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("name, arxiv", PAPERS.items())
def test_readme_cites_each_paper_with_its_arxiv_id(repo_root, name, arxiv):
    """The README's Papers section has an entry for the paper, with its title and arXiv id."""
    papers = (repo_root / "README.md").read_text().split("\n## Papers\n", 1)[1]
    entries = [e for e in papers.split("\n- ") if e.lstrip("- ").startswith(f"**{name}**")]
    assert len(entries) == 1 and f"arXiv:{arxiv}" in " ".join(entries[0].split()), name
