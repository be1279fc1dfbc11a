"""Prompts, loss-masked tokenization, data loading and GSM8K answer scoring for the causal-LM tasks.

The task formats of SPEC §3: Alpaca (QLoRA's prompt, loss on the response), HH-RLHF (the ``chosen`` transcript
is the whole target) and GSM8K (question + instruction, then the worked answer; tokenized together as in LoftQ).

    records = load_records("tests/data/gsm8k.jsonl", "gsm8k")          # or a hub id: load_records("openai/gsm8k", ...)
    example = encode_joint(tokenizer, *gsm8k_pair(records["train"][0]), max_length=512)
    extract_answer("... The final answer is: 1,234")                      # 1234.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from llmm.records import load_dataset, read_json_records

IGNORE_INDEX = -100

ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
GSM8K_INSTRUCTION = "\nAnswer the above question. First think step by step and then answer the final number.\n"
ANSWER_PREFIX = "The final answer is: "

# Fields each task's records must have (Alpaca's "input" is optional).
REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "hh-rlhf": ("chosen",), "gsm8k": ("question", "answer")}


# --- prompts -----------------------------------------------------------------------------------------------------

def alpaca_pair(record: dict) -> tuple[str, str]:
    """(source, target): the Alpaca prompt and the response."""
    template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", "")), record["output"]


def hh_rlhf_pair(record: dict) -> tuple[str, str]:
    return "", record["chosen"]


def gsm8k_source(question: str) -> str:
    return f"{question}{GSM8K_INSTRUCTION}"


def gsm8k_pair(record: dict) -> tuple[str, str]:
    """(source, target): question + instruction, and the worked answer with "####" -> "The final answer is: "."""
    return gsm8k_source(record["question"]), record["answer"].replace("####", ANSWER_PREFIX)


PAIRS = {"alpaca": alpaca_pair, "hh-rlhf": hh_rlhf_pair, "gsm8k": gsm8k_pair}


# --- tokenization with loss masking --------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: training targets end in one; set tokenizer.eos_token")
    return [tokenizer.eos_token_id]


def encode_prompt(tokenizer, source: str) -> list[int]:
    """bos + source: the ids a generation prompt starts from, as in training."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, source)


def encode_source_target(tokenizer, source: str, target: str, source_max_len: int, target_max_len: int) -> dict:
    """QLoRA's recipe: bos + source and target + eos tokenized apart, each truncated, concatenated; the source's
    labels are IGNORE_INDEX."""
    source_ids = encode_prompt(tokenizer, source)[:source_max_len]
    target_ids = (_ids(tokenizer, target) + _eos(tokenizer))[:target_max_len]
    return {"input_ids": source_ids + target_ids, "attention_mask": [1] * (len(source_ids) + len(target_ids)),
            "labels": [IGNORE_INDEX] * len(source_ids) + target_ids}


def encode_joint(tokenizer, source: str, target: str, max_length: int) -> dict:
    """LoftQ's recipe: bos + (source + target) + eos tokenized as one text, truncated; labels are IGNORE_INDEX on
    the first len(bos + source) tokens (exact unless a token spans the boundary)."""
    input_ids = (encode_prompt(tokenizer, source + target) + _eos(tokenizer))[:max_length]
    n_source = min(len(encode_prompt(tokenizer, source)), len(input_ids))
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * n_source + input_ids[n_source:]}


# --- data ----------------------------------------------------------------------------------------------------------

def check_fields(records, task: str, where: str) -> None:
    """Every record (a list of dicts, or a datasets.Dataset's columns) has the task's fields, as text."""
    required = REQUIRED_FIELDS[task]
    columns = getattr(records, "column_names", None)
    if columns is not None:  # a datasets.Dataset: check its columns once
        missing = [f for f in required if f not in columns]
        if missing:
            raise ValueError(f"{where}: no field(s) {missing} (columns: {columns}); {task} records need {required}")
        return
    for index, record in enumerate(records):
        missing = [f for f in required if f not in record]
        if missing:
            raise ValueError(f"{where}: record {index + 1} lacks field(s) {missing}; {task} records need "
                             f"{list(required)}")
        wrong = [f for f in required if not isinstance(record[f], str)]
        if wrong:
            raise ValueError(f"{where}: record {index + 1}'s {wrong[0]!r} is a {type(record[wrong[0]]).__name__}, "
                             "not text: write it as a JSON string")


def load_records(source: str, task: str, config_name: str | None = None) -> dict:
    """{split name: records} of a local .json/.jsonl file ("train" only) or a dataset directory / hub id."""
    if task not in REQUIRED_FIELDS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(REQUIRED_FIELDS)}")
    if source.endswith((".json", ".jsonl")):
        records = read_json_records(source)
        check_fields(records, task, source)
        return {"train": records}
    if Path(source).is_file():
        raise ValueError(f"data file {source!r}: local files must be .json or .jsonl (or pass a dataset directory)")
    splits = dict(load_dataset(source, config_name))
    for name, split in splits.items():
        check_fields(split, task, f"{source} [{name}]")
    return splits


# --- GSM8K answers -------------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\d.])([-\u2212]\s*\$?\s*)?(\d+(?:\.\d+)?|(?<!\w)\.\d+)")  # "-$5", "−7", ".5"
_FINAL = re.compile(r"the final answer is", re.IGNORECASE)


def _numbers(text: str) -> list[float]:
    """The numbers in ``text``; a minus sign (even "- 1", "-$5" or U+2212) is negative unless a digit or ")" precedes
    it ("5-3")."""
    text = _THOUSANDS.sub("", text)
    numbers = []
    for match in _NUMBER.finditer(text):
        before = text[: match.start()].rstrip()
        negative = match.group(1) is not None and not (before and (before[-1].isdigit() or before[-1] == ")"))
        numbers.append(-float(match.group(2)) if negative else float(match.group(2)))
    return numbers


def extract_answer(text: str) -> float | None:
    """The first number after "The final answer is", else the last number in ``text``; None if there is none.
    Thousands separators are dropped ("1,234" -> 1234)."""
    final = _FINAL.search(text)
    after = _numbers(text[final.end():]) if final else []
    if after:
        return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def gold_answer(answer: str) -> float | None:
    """The number after the last "####" of a GSM8K answer, or None."""
    if "####" not in answer:
        return None
    numbers = _numbers(answer.rsplit("####", 1)[1])
    return numbers[0] if numbers else None


def is_correct(prediction: float | None, gold: float | None) -> bool:
    """Exact numeric match (1234 == 1234.0); no number never matches."""
    return prediction is not None and gold is not None and math.isclose(prediction, gold, rel_tol=0, abs_tol=1e-9)


def accuracy(predictions: list, golds: list) -> float:
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"accuracy needs equally many predictions and golds (> 0), got {len(predictions)} and "
                         f"{len(golds)}")
    return sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(golds)


def majority_vote(answers: list) -> float | None:
    """The most frequent extracted answer (ties: the one seen first); None when no sample gave a number."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None
