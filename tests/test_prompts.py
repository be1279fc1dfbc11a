"""llmm.tasks.prompts: task formats, loss masking, data loading errors, GSM8K answer extraction and accuracy."""

import json

import pytest
from conftest import REPO_ROOT

from llmm.tasks import prompts
from llmm.tasks.prompts import IGNORE_INDEX, encode_joint, encode_prompt, encode_source_target, extract_answer

DATA = REPO_ROOT / "tests" / "data"


def fixture_texts() -> list[str]:
    texts = []
    for name in ("alpaca", "hh_rlhf", "gsm8k"):
        texts += [value for line in (DATA / f"{name}.jsonl").read_text().splitlines()
                  for value in json.loads(line).values()]
    return texts + [prompts.ALPACA_PROMPT_INPUT, prompts.ALPACA_PROMPT_NO_INPUT, prompts.GSM8K_INSTRUCTION]


def byte_level_tokenizer(texts=None, vocab_size: int = 384):
    """An offline byte-level BPE tokenizer trained in-process (decoding gives the text back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts or fixture_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def records(name):
    return prompts.read_json_records(DATA / f"{name}.jsonl")


# --- prompts and masking -------------------------------------------------------------------------------------------

def test_alpaca_prompt_with_and_without_input():
    with_input, no_input = records("alpaca")[1], records("alpaca")[0]
    source, target = prompts.alpaca_pair(with_input)
    assert source.startswith("Below is an instruction that describes a task, paired with an input")
    assert f"### Instruction:\n{with_input['instruction']}\n\n### Input:\n{with_input['input']}\n\n" in source
    assert source.endswith("### Response: ") and target == with_input["output"]
    source, _ = prompts.alpaca_pair(no_input)
    assert "### Input:" not in source and source.endswith(f"{no_input['instruction']}\n\n### Response: ")
    assert prompts.alpaca_pair({"instruction": "Hi", "output": "Hello"})[0] == source.replace(
        no_input["instruction"], "Hi")  # a missing "input" field is the no-input prompt


def test_alpaca_loss_covers_exactly_the_response(tokenizer):
    source, target = prompts.alpaca_pair(records("alpaca")[1])
    encoded = encode_source_target(tokenizer, source, target, source_max_len=384, target_max_len=128)
    source_ids = [tokenizer.bos_token_id] + tokenizer(source, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded["input_ids"] == source_ids + target_ids
    assert encoded["labels"] == [IGNORE_INDEX] * len(source_ids) + target_ids
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])
    assert tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX], skip_special_tokens=True) == target
    short = encode_source_target(tokenizer, source, target, source_max_len=7, target_max_len=3)
    assert short["input_ids"] == source_ids[:7] + target_ids[:3]
    assert short["labels"] == [IGNORE_INDEX] * 7 + target_ids[:3]


def test_hh_rlhf_trains_on_the_whole_chosen_transcript_up_to_the_target_length(tokenizer):
    record = records("hh_rlhf")[1]
    source, target = prompts.hh_rlhf_pair(record)
    assert source == "" and target == record["chosen"]
    encoded = encode_source_target(tokenizer, source, target, source_max_len=384, target_max_len=128)
    transcript = tokenizer(record["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] + transcript[:128]  # only bos is masked
    truncated = encode_source_target(tokenizer, source, target, source_max_len=384, target_max_len=10)
    assert truncated["labels"] == [IGNORE_INDEX] + transcript[:10]


def test_gsm8k_source_target_and_masking(tokenizer):
    record = records("gsm8k")[0]
    source, target = prompts.gsm8k_pair(record)
    assert source == record["question"] + ("\nAnswer the above question. First think step by step and then answer "
                                           "the final number.\n")
    assert "####" not in target and target.endswith("The final answer is:  72")  # "#### 72" -> prefix + " 72"
    encoded = encode_joint(tokenizer, source, target, max_length=512)
    n_source = len(encode_prompt(tokenizer, source))
    assert encoded["labels"][:n_source] == [IGNORE_INDEX] * n_source
    assert encoded["labels"][n_source:] == encoded["input_ids"][n_source:]
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded["labels"][n_source:], skip_special_tokens=True) == target
    assert len(encode_joint(tokenizer, source, target, max_length=20)["input_ids"]) == 20


# --- data loading --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, name", [("alpaca", "alpaca"), ("hh-rlhf", "hh_rlhf"), ("gsm8k", "gsm8k")])
def test_fixture_files_load(task, name):
    loaded = prompts.load_records(str(DATA / f"{name}.jsonl"), task)
    assert list(loaded) == ["train"] and len(loaded["train"]) >= 5


def test_json_list_file_loads(tmp_path):
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps(records("gsm8k")[:2]))
    assert prompts.load_records(str(path), "gsm8k")["train"] == records("gsm8k")[:2]


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.load_records(str(tmp_path / "missing.jsonl"), "gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: malformed JSON"):
        prompts.load_records(str(bad), "gsm8k")
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match=r"record 2 lacks field\(s\) \['answer'\]"):
        prompts.load_records(str(lacking), "gsm8k")
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['chosen'\]"):
        prompts.load_records(str(DATA / "alpaca.jsonl"), "hh-rlhf")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=".json or .jsonl"):
        prompts.load_records(str(csv), "alpaca")
    with pytest.raises(ValueError, match="unknown task"):
        prompts.load_records(str(DATA / "alpaca.jsonl"), "mmlu")


# --- GSM8K answers -------------------------------------------------------------------------------------------------

# (generation, extracted answer, gold) — the gold decides the "correct" column used for the accuracy test.
GENERATIONS = [
    ("She sold 48 + 24 = 72 clips.\nThe final answer is: 72", 72.0, 72.0),
    ("The final answer is: 1,234 dollars", 1234.0, 1234.0),                  # thousands separator
    ("In total he pays 1,000,000 dollars.", 1000000.0, 1000000.0),           # no phrase: last number
    ("3 - 8 = -5\nThe final answer is: -5", -5.0, -5.0),                     # negative
    ("The temperature drops to -12 degrees.", -12.0, 12.0),                  # negative, wrong sign vs gold
    ("9 / 4 = 2.25\nThe final answer is: 2.25 meters", 2.25, 2.25),          # decimal
    ("It costs $18.50.", 18.5, 18.5),                                        # decimal, sentence-final period
    ("First 3 + 4 = 7, then 7 x 2 = 14.", 14.0, 14.0),                       # several numbers: the last
    ("The final answer is: 5. Check: 5 + 3 = 8", 5.0, 8.0),                  # the phrase beats the last number
    ("the final answer is 42", 42.0, 42.0),                                  # lower case, no colon
    ("3 + 4 = 7. The final answer is: seven", 7.0, 7.0),                     # no number after the phrase
    ("5-3=2", 2.0, 2.0),                                                     # a minus between digits: not negative
    ("The final answer is:  - 1", -1.0, -1.0),                               # a minus, then spaces: still a sign
    ("It drops by - 4 degrees.", -4.0, -4.0),                                # the same without the phrase
    ("He has 20 - 12 = 8, then 8 - 3", 3.0, 3.0),                            # spaced subtraction: not negative
    ("The final answer is: (2 + 1) - 1 = 2", 2.0, 2.0),                      # after ")": a subtraction
    ("Answers: 3,4 and 5", 5.0, 5.0),                                        # "3,4" is a list, not 34
    ("The final answer is: .5", 0.5, 0.5),                                   # no leading zero
    ("He is short by -$5.", -5.0, -5.0),                                     # a sign before the dollar sign
    ("The final answer is: \u22127", -7.0, -7.0),                            # U+2212 minus sign
    ("Version 1.2.3 costs 4", 4.0, 4.0),                                     # ".3" after "1.2" is no number
    ("He bought 3 apples.2 were rotten", 3.0, 3.0),                          # ".2" after a word: no decimal
    ("I do not know.", None, 4.0),                                           # no number at all
    ("", None, 1.0),
]


@pytest.mark.parametrize("text, expected, gold", GENERATIONS)
def test_extract_answer(text, expected, gold):
    assert extract_answer(text) == expected


def test_gold_answers():
    assert [prompts.gold_answer(r["answer"]) for r in records("gsm8k")] == [72, 10, 5000, -5, 1, 2.25]
    assert prompts.gold_answer("no marker 12") is None and prompts.gold_answer("#### none") is None


def test_accuracy_from_the_extracted_answers():
    predictions = [extract_answer(text) for text, _, _ in GENERATIONS]
    golds = [gold for _, _, gold in GENERATIONS]
    correct = [p is not None and p == g for p, g in zip(predictions, golds)]
    assert correct.count(False) == 4  # wrong sign, phrase-vs-last, and two without a number
    assert prompts.accuracy(predictions, golds) == pytest.approx(sum(correct) / len(GENERATIONS))
    assert prompts.is_correct(72.0, 72) and not prompts.is_correct(None, 1.0) and not prompts.is_correct(1.0, None)
    with pytest.raises(ValueError, match="equally many predictions and golds"):
        prompts.accuracy([1.0], [])


def test_majority_vote():
    assert prompts.majority_vote([3.0, 5.0, None, 5.0]) == 5.0
    assert prompts.majority_vote([3.0, 5.0]) == 3.0  # a tie: the first seen
    assert prompts.majority_vote([None, None]) is None
