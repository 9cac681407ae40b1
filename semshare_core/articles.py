"""The demo articles shipped with the package, as pairs of two rewrites of one story."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTICLES_DIR = Path(__file__).parent / "articles"


@dataclass(frozen=True)
class ArticlePair:
    """One story at the advanced reading level and as its intermediate rewrite."""

    name: str
    advanced: str
    intermediate: str


def load_text(path: Path) -> str:
    """Read a UTF-8 text file (a byte order mark is dropped)."""
    return path.read_text(encoding="utf-8-sig").strip()


def article_pairs(folder: Path | None = None) -> list[ArticlePair]:
    """Return the article pairs of ``folder``: the shipped ones, or a OneStopEnglish folder with Adv/ and Int/."""
    if folder is None:
        names = sorted(p.name[: -len("-adv.txt")] for p in ARTICLES_DIR.glob("*-adv.txt"))
        return [
            ArticlePair(name, load_text(ARTICLES_DIR / f"{name}-adv.txt"), load_text(ARTICLES_DIR / f"{name}-int.txt"))
            for name in names
        ]
    pairs = []
    for advanced in sorted((folder / "Adv").glob("*-adv.txt")):
        name = advanced.name[: -len("-adv.txt")]
        intermediate = folder / "Int" / f"{name}-int.txt"
        if intermediate.is_file():
            pairs.append(ArticlePair(name, load_text(advanced), load_text(intermediate)))
    return pairs
