"""Multiple-choice questions for the calibration protocol (BLoB, NeurIPS 2024): data formats, prompt, answer letters.

Every source format becomes ``{"question": str, "choices": [str, ...], "answer": int}``: Winogrande (``sentence``,
``option1``, ``option2``, ``answer`` "1"/"2"), ARC (``question``, ``choices`` {``text``, ``label``}, ``answerKey``),
OpenBookQA (``question_stem`` and ARC's fields), BoolQ (``question``, ``passage``, ``answer`` bool or ``label`` 0/1
-> choices "no"/"yes") and MMLU / the normalised form (``question``, ``choices`` list, ``answer`` index).

The prompt (BLoB's zero-shot template) lists the lettered choices and ends in "Answer:"; the prediction is the
next-token distribution over the choices' letters. Prompts longer than max_length lose their beginning.

    records = load_mcq("tests/data/mcq/arc.jsonl")                      # or a hub id + config + split
    example = encode_question(tokenizer, records[0], max_length=300)
"""

from __future__ import annotations

from pathlib import Path

from llmm.records import load_dataset, read_json_records

LETTERS = "ABCDEFGHIJ"
PROMPT = "Return the label of the correct answer for the question below.\n\nQuestion: {question}\nChoices:\n{choices}\n"
ANSWER_CUE = "Answer:"
BOOLQ_CHOICES = ("no", "yes")


def format_prompt(record: dict) -> str:
    """The question, its lettered choices ("A) ...", one per line) and the answer cue."""
    choices = "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(record["choices"]))
    return PROMPT.format(question=record["question"], choices=choices) + ANSWER_CUE


# --- normalising the source formats ---------------------------------------------------------------------------------

FIX = ": fix the record or remove it"  # the end of a bad record's error line


def _labelled(record: dict, question: str, where: str) -> dict:
    """ARC / OBQA: choices {text, label} and an answerKey that must be one of the labels."""
    choices = record.get("choices")
    if not isinstance(choices, dict) or not choices.get("text"):
        raise ValueError(f"{where}: the question has no choices ('choices' needs a non-empty 'text' list){FIX}")
    texts, labels = list(choices["text"]), [str(label) for label in choices.get("label") or []]
    if len(labels) != len(texts):
        raise ValueError(f"{where}: {len(texts)} choice texts but {len(labels)} labels{FIX}")
    key = str(record["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"{where}: answer key {key!r} is not among the choice labels {labels}{FIX}")
    return {"question": question, "choices": texts, "answer": labels.index(key)}


def _winogrande(record: dict, where: str) -> dict:
    answer = str(record["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"{where}: Winogrande answer {record['answer']!r} is not among the options ('1' or '2'){FIX}")
    return {"question": record["sentence"], "choices": [record["option1"], record["option2"]],
            "answer": int(answer) - 1}


def _boolq(record: dict, where: str) -> dict:
    answer = record["answer"] if "answer" in record else record.get("label")
    if isinstance(answer, bool) or answer in (0, 1):
        question = f"{record['passage']}\n{record['question']}"
        return {"question": question, "choices": list(BOOLQ_CHOICES), "answer": int(answer)}
    raise ValueError(f"{where}: BoolQ answer {answer!r} is not a yes/no value (true/false or 0/1){FIX}")


def _indexed(record: dict, where: str) -> dict:
    """MMLU and the normalised form: choices a list, answer an index into it (an int, or a letter)."""
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: the question has no choices (an empty or missing 'choices' list){FIX}")
    answer = record["answer"]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS:
        answer = LETTERS.index(answer.strip())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {record['answer']!r} is not among the {len(choices)} choices (an index "
                         f"0..{len(choices) - 1}){FIX}")
    return {"question": record["question"], "choices": list(choices), "answer": answer}


def _check_texts(record: dict, normalised: dict, where: str) -> None:
    """The question and every choice are non-empty text (a number reads as text); no two choices are equal once
    stripped and case-folded."""
    field = next(f for f in ("question_stem", "sentence", "question") if f in record)
    question = record[field]  # BoolQ's normalised question also holds the passage: check the source field
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: field {field!r} is {question!r}: a question needs non-empty text")
    field = "choices" if "choices" in record else "option1/option2"
    texts = []
    for index, choice in enumerate(normalised["choices"]):
        if isinstance(choice, bool) or not isinstance(choice, (str, int, float)) or not str(choice).strip():
            raise ValueError(f"{where}: field {field!r}, choice {index + 1} is {choice!r}: every choice needs "
                             "non-empty text")
        texts.append(str(choice))
    seen: dict[str, int] = {}
    for index, text in enumerate(texts):
        key = text.strip().casefold()
        if key in seen:
            raise ValueError(f"{where}: field {field!r} repeats a choice: {texts[seen[key]]!r} (choice "
                             f"{seen[key] + 1}) and {text!r} (choice {index + 1}) are the same answer; remove one "
                             "or fix the record")
        seen[key] = index
    normalised["choices"] = texts


def normalise(record: dict, where: str = "record") -> dict:
    """One source record (any format above) -> {question, choices, answer}; a bad record is a ValueError."""
    if {"sentence", "option1", "option2", "answer"} <= set(record):
        normalised = _winogrande(record, where)
    elif "question_stem" in record and "answerKey" in record:
        normalised = _labelled(record, record["question_stem"], where)
    elif "passage" in record and "question" in record:
        normalised = _boolq(record, where)
    elif {"question", "choices", "answerKey"} <= set(record):
        normalised = _labelled(record, record["question"], where)
    elif {"question", "choices", "answer"} <= set(record):
        normalised = _indexed(record, where)
    elif "question" in record or "question_stem" in record:
        raise ValueError(f"{where}: the question has no choices (fields: {sorted(record)}){FIX}")
    else:
        raise ValueError(f"{where}: not a multiple-choice record (fields {sorted(record)}); expected Winogrande, "
                         "ARC, OpenBookQA, BoolQ or MMLU fields, or {question, choices, answer}")
    _check_texts(record, normalised, where)
    if len(normalised["choices"]) > len(LETTERS):
        raise ValueError(f"{where}: {len(normalised['choices'])} choices, at most {len(LETTERS)} are supported{FIX}")
    if len(normalised["choices"]) < 2:
        raise ValueError(f"{where}: a question needs at least two choices, got {normalised['choices']}{FIX}")
    return normalised


def load_mcq(source: str, config_name: str | None = None, split: str | None = None) -> list[dict]:
    """Normalised records of a local .json/.jsonl file, or of one split of a hub dataset / dataset directory."""
    if source.endswith((".json", ".jsonl")):
        raw, where = read_json_records(source), source
    elif Path(source).is_file():
        raise ValueError(f"data file {source!r}: local files must be .json or .jsonl (or pass a dataset directory)")
    else:
        splits = load_dataset(source, config_name)
        if split not in splits:
            raise ValueError(f"{source} ({config_name}) has no {split!r} split (splits: {sorted(splits)})")
        raw, where = list(splits[split]), f"{source} [{config_name}/{split}]"
    if not raw:
        raise ValueError(f"{where} holds no records: pass a file (or split) with at least one question")
    return [normalise(record, record_where(where, index, record)) for index, record in enumerate(raw)]


def record_where(where: str, index: int, record) -> str:
    """'FILE, record 3 (id 'Mercury_3')'."""
    ident = record.get("id") if isinstance(record, dict) else None
    return f"{where}, record {index + 1}" + (f" (id {ident!r})" if ident is not None else "")


def question_ids(source: str, config_name: str | None = None, split: str | None = None) -> list[str]:
    """The id of every question ``load_mcq`` returns: the record's ``id``, else its position from 1."""
    local = source.endswith((".json", ".jsonl"))
    raw = read_json_records(source) if local else list(load_dataset(source, config_name)[split])
    return [str(r["id"]) if isinstance(r, dict) and r.get("id") is not None else str(i + 1) for i, r in enumerate(raw)]


# --- tokens ----------------------------------------------------------------------------------------------------------

def letter_token_ids(tokenizer, n_letters: int) -> list[int]:
    """The token each answer letter is after the cue: the one token that "Answer: X" adds to "Answer:"."""
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n_letters]:
        full = tokenizer(f"{ANSWER_CUE} {letter}", add_special_tokens=False)["input_ids"]
        if full[:len(cue)] != cue or len(full) != len(cue) + 1:
            raise ValueError(f"the tokenizer does not write the answer letter {letter!r} as one token after "
                             f"{ANSWER_CUE!r} ({cue} -> {full}): use a tokenizer with single-token letters")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer maps different answer letters to the same token ({ids})")
    return ids


def encode_question(tokenizer, record: dict, max_length: int) -> dict:
    """bos + prompt tokens (its beginning dropped beyond ``max_length``), the answer index and the choice count."""
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    input_ids = bos + prompt[-(max_length - len(bos)):]  # its last max_length - len(bos) (>= 7) tokens
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": record["answer"],
            "n_choices": len(record["choices"])}
