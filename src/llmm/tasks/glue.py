"""GLUE for sequence classification: the task registry, data (hub or local files), tokenization and metrics.

    task = get_task("mrpc")                                    # text columns, labels, metrics, dev splits
    raw = load_glue(task, data_dir="glue_data/MRPC")           # the GLUE TSVs as distributed
    raw = load_glue(task, train_file="train.jsonl", validation_files=["dev.jsonl"])   # CSV / JSON / JSONL
    raw = load_glue(task)                                      # the hub: datasets.load_dataset("nyu-mll/glue", "mrpc")
    data = tokenize(raw, task, tokenizer, max_length=128)
    scores = task_metrics(task, predictions, labels)           # e.g. {"accuracy": .., "f1": ..}
    outputs = predict(model, data["validation"], collator, batch_size=64, mode="mean")   # logits
    outputs = predict(model, data["validation"], collator, 64, "mc", mc_samples=10, seed=0)  # log of MC probs
    scores = score(task, outputs, labels)                      # task metrics + NLL / Brier / ECE

Local files use the hub's column names (CSV/JSON/JSONL) or the GLUE distribution's own TSV layout; labels may be
class ids or label names. Metrics (SPEC §3): CoLA Matthews; STS-B Pearson/Spearman; MRPC and QQP accuracy and F1
(F1 picks the best epoch, as in LoftQ's run_glue.py); the others accuracy."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmm.records import load_dataset, not_a_directory, read_json_records

logger = logging.getLogger(__name__)

GLUE_HUB_ID = "nyu-mll/glue"
LOCAL_FORMATS = (".tsv", ".csv", ".json", ".jsonl")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task. ``label_names`` is empty for regression (STS-B)."""

    name: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]  # the first is the main metric
    glue_dir: str  # the task's folder in the GLUE distribution (glue_data/<glue_dir>)
    tsv_columns: dict = field(default_factory=dict)  # our column -> the TSV's header name, or index if headerless
    tsv_header: bool = True
    dev_files: dict = field(default_factory=lambda: {"validation": "dev.tsv"})  # dev split -> TSV file name
    select_by: str = ""  # the metric that picks the best epoch; empty: the first of ``metrics``

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return tuple(self.dev_files)

    @property
    def main_metric(self) -> str:
        return self.select_by or self.metrics[0]

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_columns, "label")


def _pair(first: str, second: str) -> dict:
    return {first: first, second: second, "label": "label"}


# Label order = the hub's ClassLabel order, so class ids mean the same in every source.
TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), "CoLA",
                 tsv_columns={"sentence": 3, "label": 1}, tsv_header=False),
        GlueTask("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "SST-2",
                 tsv_columns={"sentence": "sentence", "label": "label"}),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "MRPC",
                 tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}, select_by="f1"),
        GlueTask("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), "STS-B",
                 tsv_columns={"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "QQP",
                 tsv_columns={"question1": "question1", "question2": "question2", "label": "is_duplicate"},
                 select_by="f1"),
        GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",), "MNLI",
                 tsv_columns={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                 dev_files={"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "QNLI",
                 tsv_columns=_pair("question", "sentence")),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE",
                 tsv_columns=_pair("sentence1", "sentence2")),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "WNLI",
                 tsv_columns=_pair("sentence1", "sentence2")),
        # Not GLUE: BBC News topics, the offline quick start's task (local files from scripts.prepare_bbcnews,
        # label ids = sorted class names). Its test split is scored every epoch beside the dev split.
        GlueTask("bbcnews", ("sentence",), ("business", "entertainment", "politics", "sports", "tech"),
                 ("accuracy", "f1_macro"), "bbcnews", tsv_columns={"sentence": "sentence", "label": "label"},
                 dev_files={"validation": "dev.tsv", "test": "test.tsv"}),
    )
}
LOCAL_ONLY_TASKS = ("bbcnews",)


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------------- data

def load_glue(task: GlueTask, data_dir: str | None = None, train_file: str | None = None,
              validation_files: list[str] | None = None):
    """``DatasetDict`` with ``train`` and the task's dev splits, from local files or the hub (when none is given)."""
    from datasets import DatasetDict

    if data_dir and (train_file or validation_files):
        raise ValueError("pass either --data_dir (a GLUE task folder) or --train_file/--validation_file, not both")
    if bool(train_file) != bool(validation_files):
        raise ValueError("pass both --train_file and --validation_file (or --data_dir, or neither for the hub)")
    if data_dir:
        files = _glue_dir_files(task, data_dir)
    elif train_file:
        if len(validation_files) != len(task.dev_splits):
            raise ValueError(f"{task.name} has {len(task.dev_splits)} dev split(s) {list(task.dev_splits)}, got "
                             f"{len(validation_files)} --validation_file paths: pass one file per split, in that "
                             "order")
        files = {"train": train_file, **dict(zip(task.dev_splits, validation_files))}
    else:
        return _load_hub(task)
    data = DatasetDict({split: load_file(task, path) for split, path in files.items()})
    for split in task.dev_splits if task.is_regression else ():
        if len(set(data[split]["label"])) < 2:  # Pearson and Spearman divide by the scores' spread
            raise ValueError(f"{str(files[split])!r}: its {len(data[split])} scores are all equal, so Pearson and "
                             "Spearman are undefined: pass a dev file whose scores vary")
    return data


def _glue_dir_files(task: GlueTask, data_dir: str) -> dict[str, Path]:
    """train.tsv and the dev TSVs in ``data_dir`` or in ``data_dir/<GLUE folder>`` (e.g. glue_data/CoLA)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {data_dir!r} {not_a_directory(data_dir)}: pass a GLUE task folder "
                                "(train.tsv, dev.tsv) or its parent")
    folder = root if (root / "train.tsv").is_file() else root / task.glue_dir
    files = {"train": folder / "train.tsv", **{split: folder / name for split, name in task.dev_files.items()}}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {str(root)!r} (nor in {str(root / task.glue_dir)!r}): --data_dir takes a GLUE "
                f"task folder holding train.tsv and {', '.join(task.dev_files.values())}; for CSV/JSON files use "
                "--train_file/--validation_file")
    return files


def _load_hub(task: GlueTask):
    from datasets import DatasetDict

    if task.name in LOCAL_ONLY_TASKS:
        raise ValueError(f"task {task.name!r} has no hub copy: pass --train_file/--validation_file (for bbcnews, "
                         "files written by python -m scripts.prepare_bbcnews)")
    raw = load_dataset(GLUE_HUB_ID, task.name, fix="pass --data_dir or --train_file/--validation_file for local "
                       "files")
    return DatasetDict({split: raw[split].select_columns(list(task.columns)) for split in ("train", *task.dev_splits)})


def load_file(task: GlueTask, path: str | Path):
    """One local file (TSV as distributed, CSV, JSON, JSONL) as a ``Dataset`` with the text columns and ``label``."""
    from datasets import Dataset, Features, Value

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise ValueError(f"data file {str(path)!r}: unsupported format {suffix!r}; use one of {LOCAL_FORMATS}")
    columns = _read_tsv(task, path) if suffix == ".tsv" else _read_records(task, path)
    if not columns["label"]:
        raise ValueError(f"data file {str(path)!r} holds no examples")
    columns["label"] = _convert_labels(task, columns["label"], path)
    label_type = Value("float32") if task.is_regression else Value("int64")
    features = Features({**{c: Value("string") for c in task.text_columns}, "label": label_type})
    return Dataset.from_dict(columns, features=features)


def _read_tsv(task: GlueTask, path: Path) -> dict[str, list]:
    """A GLUE TSV as distributed (no quoting); a TSV whose header has the hub's column names works too."""
    with open(path, encoding="utf-8-sig") as handle:  # MRPC's files start with a byte-order mark
        lines = [line.rstrip("\n").rstrip("\r") for line in handle if line.strip()]
    first = lines[0].split("\t") if lines else []
    if all(c in first for c in task.columns):  # header with the hub's names
        header, index = True, {c: first.index(c) for c in task.columns}
    elif task.tsv_header:
        missing = [name for name in task.tsv_columns.values() if name not in first]
        if missing:
            raise ValueError(f"data file {str(path)!r} has no column(s) {missing} (header: {first}); a {task.name} TSV "
                             f"needs the GLUE header {list(task.tsv_columns.values())} or {list(task.columns)}")
        header, index = True, {c: first.index(name) for c, name in task.tsv_columns.items()}
    else:
        header, index = False, dict(task.tsv_columns)
    width = max(index.values()) + 1
    columns, skipped = {c: [] for c in task.columns}, []
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        fields = line.split("\t")
        if len(fields) < width:
            skipped.append(number)
            continue
        for column, position in index.items():
            columns[column].append(fields[position])
    if skipped:
        if len(skipped) > max(2, len(lines) // 100):
            raise ValueError(f"data file {str(path)!r}: {len(skipped)} lines have fewer than {width} tab-separated "
                             f"fields (first: line {skipped[0]}); is it a {task.name} GLUE TSV?")
        logger.warning("%s: skipped %d malformed line(s) (first: line %d)", path, len(skipped), skipped[0])
    return columns


def _read_records(task: GlueTask, path: Path) -> dict[str, list]:
    """CSV with a header, a JSON list of objects, or JSON lines; columns named as on the hub."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            records = list(csv.DictReader(handle))
    else:
        records = read_json_records(path)
    columns = {c: [] for c in task.columns}
    for number, record in enumerate(records, start=1):
        missing = [c for c in task.columns if c not in record]
        if missing:
            raise ValueError(f"data file {str(path)!r} has no column(s) {missing} (record {number} has "
                             f"{sorted(record)}); {task.name} needs {list(task.columns)}")
        for column in task.columns:
            columns[column].append(record[column])
    for column in task.text_columns:
        bad = next((i for i, v in enumerate(columns[column], start=1) if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"data file {str(path)!r}: text column {column!r} of record {bad} is "
                             f"{columns[column][bad - 1]!r}, not a string")
    return columns


def _convert_labels(task: GlueTask, values: list, path: Path) -> list:
    """Class ids (ints, integral floats, digit strings or label names) or, for regression, numbers."""
    converted = []
    for row, value in enumerate(values, start=1):
        label = _as_number(value) if task.is_regression else _as_class_id(value, task.label_names)
        if label is None and task.is_regression:
            raise ValueError(f"data file {str(path)!r}: label {value!r} in row {row} is not a number; "
                             f"{task.name} is a regression task (scores such as 3.8)")
        if label is None:
            raise ValueError(f"data file {str(path)!r}: label {value!r} in row {row} is not a {task.name} label; use "
                             f"integers 0..{task.num_labels - 1} or one of {list(task.label_names)}")
        converted.append(label)
    return converted


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_class_id(value, names: tuple[str, ...]) -> int | None:
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    number = _as_number(value)
    return int(number) if number is not None and number.is_integer() and 0 <= number < len(names) else None


def tokenize(raw, task: GlueTask, tokenizer, max_length: int):
    """Token ids (truncated to ``max_length``; padding is left to the collator) and ``labels``, per split."""
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")

    def encode(batch):
        encoded = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    return raw.__class__({split: data.map(encode, batched=True, remove_columns=data.column_names,
                                          desc=f"tokenizing {task.name} {split}")
                          for split, data in raw.items()})


# -------------------------------------------------------------------------------------------------------- metrics

def task_metrics(task: GlueTask, predictions, labels) -> dict[str, float | None]:
    """The task's metrics: ``predictions`` are class ids (classification) or scores (STS-B). NaN becomes None."""
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions for {labels.size} labels")
    functions = {"accuracy": lambda: accuracy_score(labels, predictions), "f1": lambda: f1_score(labels, predictions),
                 "f1_macro": lambda: f1_score(labels, predictions, average="macro"),
                 "matthews_correlation": lambda: matthews_corrcoef(labels, predictions),
                 "pearson": lambda: pearsonr(predictions, labels)[0],
                 "spearmanr": lambda: spearmanr(predictions, labels)[0]}
    scores = {}
    for name in task.metrics:
        with warnings.catch_warnings():  # a constant input makes a correlation undefined: reported as None
            warnings.simplefilter("ignore", ConstantInputWarning)
            value = float(functions[name]())
        scores[name] = value if math.isfinite(value) else None
    return scores


def score(task: GlueTask, outputs, labels) -> dict:
    """Task metrics of ``outputs`` (logits or log-probabilities; STS-B scores) and, for classification, NLL / Brier /
    ECE of their softmax (NaN for a non-finite output). In float64 whatever the outputs' dtype, so the figures
    recomputed from a saved file (JSON numbers) are the ones the run recorded."""
    from scipy.special import softmax

    from llmm.metrics import calibration_metrics

    outputs, labels = np.asarray(outputs, dtype=np.float64), np.asarray(labels)
    if task.is_regression:
        return task_metrics(task, outputs.reshape(-1), labels.astype(np.float64))
    probs = softmax(outputs, axis=-1)
    if not np.isfinite(probs).all():  # a diverged model predicts no class (argmax would read NaN as class 0)
        return {**dict.fromkeys(task.metrics), "nll": math.nan, "brier": math.nan, "ece": math.nan}
    return {**task_metrics(task, probs.argmax(axis=-1), labels), **calibration_metrics(probs, labels)}


def mc_outputs(model, inputs, mc_samples: int, seed: int, regression: bool):
    """One batch's Monte-Carlo outputs as every GLUE evaluation records them (training's dev evaluation, the width
    search, scripts.eval_glue): the average of ``mc_samples`` networks' STS-B scores, else the log of their averaged
    distribution (softmax gives it back exactly), in float32; network n draws from stream n of ``seed``
    (``llmm.noise.mc_streams``), so it is the same network on every batch and in every script."""
    from llmm.predict import mc_predict, mc_regress

    if regression:
        return mc_regress(model, inputs, mc_samples, seed=seed)
    return mc_predict(model, inputs, mc_samples, seed=seed).clamp_min(1e-12).log()


def predict(model, dataset, collator, batch_size: int, mode: str = "mean", mc_samples: int = 10,
            seed: int | None = None) -> np.ndarray:
    """The model's outputs on a tokenized split: (n, classes) logits, or (n,) for regression. ``mode``: "mean"
    (eps = 0), "sample" (one noise draw per batch, from the model's generator) or "mc" (``mc_outputs``: the
    ``mc_samples`` networks of ``seed``'s streams)."""
    import torch

    from llmm.model import noise_mode
    from llmm.predict import LABEL_KEYS

    if mode not in ("mean", "sample", "mc"):
        raise ValueError(f"mode must be mean, sample or mc, got {mode!r}")
    if mode == "mc" and seed is None:
        raise ValueError("mode mc draws network n from stream n of a seed: pass seed=<an integer >= 0>")
    regression = getattr(model.config, "num_labels", None) == 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(dataset), batch_size):  # the whole split, in order, on every process
            rows = dataset[start:start + batch_size]
            batch = collator([{key: rows[key][i] for key in rows} for i in range(len(rows["input_ids"]))])
            inputs = {key: value.to(device) for key, value in batch.items() if key not in LABEL_KEYS}
            with torch.no_grad():
                if mode == "mc":
                    out = mc_outputs(model, inputs, mc_samples, seed, regression)
                else:
                    with noise_mode(model, mode):
                        out = model(**inputs).logits.float()
            outputs.append(out.squeeze(-1) if regression else out)
    finally:
        model.train(was_training)
    return torch.cat(outputs).cpu().numpy()
