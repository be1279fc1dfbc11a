"""Multiple-choice calibration (llmm.tasks, llmm.width, scripts.train_mcq / test_mcq / mcq_table) on a tiny Llama:
the formats, the letter distribution, the metrics against hand-computed values, the modes' invariants, bad input,
and an end-to-end train + evaluate + ensemble + table run."""

import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_prompts import byte_level_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from llmm import stats
from llmm.run import cli
from llmm.run.mcq import evaluation_cell
from llmm import LlmmConfig, get_llmm_model
from llmm.tasks import calibration as C
from llmm.tasks.mcq import LETTERS, encode_question, format_prompt, letter_token_ids, load_mcq, normalise
from llmm.width import distribution_width, width_summary

DATA = REPO_ROOT / "tests" / "data" / "mcq"
FORMATS = ("winogrande", "arc", "obqa", "boolq", "mmlu")


def make_tokenizer():
    texts = [format_prompt(r) for name in FORMATS for r in load_mcq(str(DATA / f"{name}.jsonl"))]
    return byte_level_tokenizer(texts + [f"Answer: {letter}" for letter in LETTERS] * 20, vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def tiny_causal_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def llmm_model(tokenizer, k=2, dropout=0.0, directions=0.0):
    config = LlmmConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], k=k, scale=4.0,
                        lora_dropout=dropout)
    model = get_llmm_model(tiny_causal_lm(tokenizer), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.normal_(0, 0.3)
        for name, parameter in model.named_parameters():  # after the means: the same means for any directions
            if "lora_llmm" in name:
                parameter.normal_(0, directions) if directions else parameter.zero_()
    return model.eval()


def question_batches(tokenizer, names=("arc", "winogrande", "boolq"), batch_size=3):
    records = [r for name in names for r in load_mcq(str(DATA / f"{name}.jsonl"))]
    encoded = [encode_question(tokenizer, r, max_length=300) for r in records]
    return C.batches(encoded, batch_size, tokenizer.pad_token_id, "cpu"), records


# --- formats -------------------------------------------------------------------------------------------------------

def test_each_format_normalises_to_question_choices_answer():
    wino, arc, obqa, boolq, mmlu = (load_mcq(str(DATA / f"{name}.jsonl")) for name in FORMATS)
    assert wino[0] == {"question": wino[0]["question"], "choices": ["Sarah", "Maria"], "answer": 0}
    assert wino[3]["answer"] == 1 and "_" in wino[3]["question"]
    assert [len(r["choices"]) for r in arc] == [4, 3, 5, 4]
    assert arc[1] == {"question": "Which object is a conductor of electricity?",
                      "choices": ["rubber band", "copper wire", "wooden spoon"], "answer": 1}  # numeric labels "1".."3"
    assert arc[2]["choices"][arc[2]["answer"]] == "gram"
    assert obqa[0]["question"] == "The sun is responsible for" and obqa[0]["answer"] == 3
    assert [r["answer"] for r in boolq] == [1, 0, 1] and boolq[0]["choices"] == ["no", "yes"]
    assert boolq[0]["question"].startswith("The Sun is the star") and boolq[0]["question"].endswith("is the sun a star")
    assert mmlu[1]["choices"][mmlu[1]["answer"]] == "newton"
    assert normalise({"question": "q", "passage": "p", "label": 0})["answer"] == 0  # super_glue's BoolQ


def test_prompt_lists_lettered_choices_and_ends_in_the_cue():
    prompt = format_prompt({"question": "Which?", "choices": ["x", "y", "z"], "answer": 2})
    assert "Question: Which?\nChoices:\nA) x\nB) y\nC) z\n" in prompt and prompt.endswith("Answer:")


@pytest.mark.parametrize("record, problem", [
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
     r"answer key 'E' is not among the choice labels \['A', 'B'\]"),
    ({"question": "q", "choices": {"text": [], "label": []}, "answerKey": "A"}, "has no choices"),
    ({"question": "q", "choices": [], "answer": 0}, "has no choices"),
    ({"question": "q"}, "has no choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is not among the 2 choices"),
    ({"sentence": "s _", "option1": "a", "option2": "b", "answer": "3"}, "not among the options"),
    ({"question": "q", "passage": "p", "answer": "maybe"}, "not a yes/no value"),
    ({"text": "t"}, "not a multiple-choice record"),
])
def test_bad_records_are_one_clear_error(record, problem):
    with pytest.raises(ValueError, match=problem) as error:
        normalise(record)
    assert str(error.value).endswith(("fix the record or remove it", "or {question, choices, answer}"))  # the fix


def test_bad_files_name_the_file_and_record(tmp_path):
    with pytest.raises(ValueError, match=r"bad_answer_key.jsonl, record 1: answer key 'E' is not among"):
        load_mcq(str(DATA / "bad_answer_key.jsonl"))
    with pytest.raises(ValueError, match=r"no_choices.jsonl, record 1: the question has no choices"):
        load_mcq(str(DATA / "no_choices.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"blank.jsonl holds no records: pass a file \(or split\) with at least one"):
        load_mcq(str(tmp_path / "blank.jsonl"))


def test_letters_are_single_tokens_after_the_cue_and_long_prompts_keep_their_end(tokenizer):
    ids = letter_token_ids(tokenizer, 5)
    assert len(set(ids)) == 5
    for letter, token in zip("ABCDE", ids):
        assert tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"][-1] == token
    record = {"question": "word " * 400, "choices": ["a", "b"], "answer": 1}
    encoded = encode_question(tokenizer, record, max_length=40)
    assert len(encoded["input_ids"]) == 40 and encoded["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode(encoded["input_ids"][1:]).endswith("A) a\nB) b\nAnswer:")
    assert (encoded["labels"], encoded["n_choices"]) == (1, 2)


# --- the letter distribution -----------------------------------------------------------------------------------------

def test_letter_distribution_sums_to_one_over_each_questions_choices(tokenizer):
    model = llmm_model(tokenizer)
    batches, records = question_batches(tokenizer)
    head = C.LetterHead(model, letter_token_ids(tokenizer, 5))
    probs, labels = C.predict(head, batches, "mean")
    n_choices = np.array([len(r["choices"]) for r in records])
    assert probs.shape == (len(records), 5) and set(n_choices) == {2, 3, 4, 5}
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    for row, n in zip(probs, n_choices):
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    assert list(labels) == [r["answer"] for r in records]


def test_padded_batch_reads_each_questions_own_last_token(tokenizer):
    """The batched, right-padded head equals an unpadded forward per question, softmax over its letters."""
    model = llmm_model(tokenizer)
    batches, records = question_batches(tokenizer, batch_size=4)
    letters = letter_token_ids(tokenizer, 5)
    probs, _ = C.predict(C.LetterHead(model, letters), batches, "mean")
    for row, record in zip(probs, records):
        ids = torch.tensor([encode_question(tokenizer, record, 300)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1, letters[:len(record["choices"])]]
        np.testing.assert_allclose(row[:len(record["choices"])], logits.softmax(-1).numpy(), atol=1e-5)


# --- metrics ---------------------------------------------------------------------------------------------------------

def test_accuracy_ece_nll_brier_equal_hand_computed_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    report = C.evaluate(probs, labels)
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4)
    assert report["brier"] == pytest.approx((0.02 + 0.72 + 0.18 + 0.08) / 4)
    # four singleton bins of 15: |1 - .9|, |0 - .6|, |1 - .7|, |1 - .8|
    assert report["ece"] == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4)
    bins = report["reliability"]
    assert sum(bins["count"]) == 4 and [i for i, c in enumerate(bins["count"]) if c] == [8, 10, 11, 13]
    gap = sum(c / 4 * abs(a - f) for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
    assert gap == pytest.approx(report["ece"])


# --- modes -----------------------------------------------------------------------------------------------------------

def test_mc_with_zero_directions_equals_mean_and_differs_with_noise(tokenizer):
    batches, _ = question_batches(tokenizer)
    letters = letter_token_ids(tokenizer, 5)
    head = C.LetterHead(llmm_model(tokenizer, directions=0.0), letters)
    mean, _ = C.predict(head, batches, "mean")
    torch.manual_seed(0)
    np.testing.assert_allclose(C.predict(head, batches, "mc", 3)[0], mean, atol=1e-6)
    np.testing.assert_allclose(C.predict(head, batches, "sample")[0], mean, atol=1e-6)
    noisy = C.LetterHead(llmm_model(tokenizer, directions=2.0), letters)
    noisy_mean, _ = C.predict(noisy, batches, "mean")
    np.testing.assert_allclose(noisy_mean, mean, atol=1e-6)  # same means
    torch.manual_seed(0)
    mc = C.predict(noisy, batches, "mc", 4)[0]
    assert np.abs(mc - mean).max() > 1e-3
    np.testing.assert_allclose(mc.sum(axis=1), 1.0, atol=1e-6)


def test_mc_dropout_samples_only_with_dropout(tokenizer):
    batches, _ = question_batches(tokenizer)
    letters = letter_token_ids(tokenizer, 5)
    head = C.LetterHead(llmm_model(tokenizer, k=0, dropout=0.5), letters)
    mean, _ = C.predict(head, batches, "mean")
    torch.manual_seed(0)
    dropout, _ = C.predict(head, batches, "dropout", 3)
    assert np.abs(dropout - mean).max() > 1e-3 and not head.training
    np.testing.assert_array_equal(C.predict(head, batches, "mean")[0], mean)  # dropout is off again
    with pytest.raises(ValueError, match="MC-dropout needs dropout"):
        C.predict(C.LetterHead(llmm_model(tokenizer, k=0), letters), batches, "dropout", 2)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_n_below_one_is_an_error(tokenizer, n):
    batches, _ = question_batches(tokenizer, names=("boolq",))
    head = C.LetterHead(llmm_model(tokenizer), letter_token_ids(tokenizer, 2))
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1"):
        C.predict(head, batches, "mc", n)


def test_width_is_noise_norm_over_mean_norm(tokenizer):
    model = llmm_model(tokenizer, directions=0.0)
    widths = distribution_width(model)
    assert len(widths) == 5 and all(w == {"A": 0.0, "B": 0.0} for w in widths.values())  # Z = 0: a point
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_llmm_A["default"].weight.fill_(1.0)
    expected = layer.lora_llmm_A["default"].weight.norm().item() / (2.0 * layer.lora_A["default"].weight.norm().item())
    assert distribution_width(model)["base_model.model.model.layers.0.self_attn.q_proj"]["A"] == pytest.approx(
        expected)  # sqrt(scale) = 2
    assert width_summary(distribution_width(model))["A"]["max"] == pytest.approx(expected)


def test_width_of_gaussian_embedding_pairs():
    """Embedding pairs keep their means in lora_embedding_A / B: the width reads them through the layer's variant."""
    from conftest import tiny_llama

    model = get_llmm_model(tiny_llama(), LlmmConfig(r=4, lora_alpha=8, k=2, gaussian_embeddings=True,
                                                   target_modules=["q_proj", "embed_tokens"]))
    table = model.base_model.model.model.embed_tokens
    with torch.no_grad():
        table.lora_embedding_B["default"].fill_(1.0)
        table.lora_llmm_B["default"].weight.fill_(0.5)
    widths = distribution_width(model)
    scale = table.llmm_settings["default"]["scale"]
    expected = table.lora_llmm_B["default"].weight.norm().item() / (
        math.sqrt(scale) * table.lora_embedding_B["default"].norm().item())
    assert widths["base_model.model.model.embed_tokens"]["B"] == pytest.approx(expected) and expected > 0


# --- scripts end to end ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("mcq") / "tiny-llama"
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_argv(model_dir, out, *extra):
    """A tiny train_mcq run; 2 Monte-Carlo passes where a mode samples (--method map evaluates its mean only)."""
    passes = [] if "map" in extra else ["--mc_samples", "2"]
    return ["--task", "arc_e", "--model_name_or_path", str(model_dir), "--train_data", str(DATA / "arc.jsonl"),
            "--test_data", str(DATA / "arc.jsonl"), "--load_in_8bit", "false", "--dtype", "float32",
            "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "2", *passes, "--output_dir", str(out),
            *extra]


def test_train_evaluate_ensemble_and_table_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch):
    from scripts import mcq_table, test_mcq, train_mcq

    ood = ["--ood", str(DATA / "obqa.jsonl"), str(DATA / "winogrande.jsonl"), str(DATA / "boolq.jsonl")]
    llmm = train_mcq.main(train_argv(tiny_dir, tmp_path / "llmm", *ood, "--eval_modes", "mean", "mc",
                                     "--save_steps", "2"))
    assert (llmm["method"], llmm["K"], llmm["backbone"], llmm["global_step"]) == ("llmm", 2, "fp32", 2)
    entries = {(e["eval_set"], e["mode"]): e for e in llmm["evaluations"]}
    assert set(entries) == {(s, m) for s in ("arc_e", "obqa", "winogrande", "boolq") for m in ("mean", "mc")}
    assert entries[("arc_e", "mc")]["eval_samples"] == 2 and entries[("arc_e", "mean")]["shift"] == "in-distribution"
    assert entries[("boolq", "mean")]["shift"] == "ood" and entries[("boolq", "mean")]["n"] == 3
    for entry in entries.values():
        assert 0 <= entry["ece"] <= 1 and entry["nll"] > 0 and 0 <= entry["brier"] <= 2
    history = llmm["width"]["history"]
    assert history[0]["step"] == 0 and history[0]["A"]["max"] == 0.0 and history[-1]["step"] == 2
    assert history[-1]["B"]["max"] > 0  # the directions moved off zero
    out = tmp_path / "llmm"
    for name in ("adapter/adapter_config.json", "mean_adapter/adapter_config.json", "curves.png", "settings.json",
                 "reliability-arc_e.png", "reliability-boolq.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["seed"] == 1 and saved["evaluations"][0]["K"] == 2
    assert json.loads((out / "settings.json").read_text())["learning_rate"] == 1e-4  # the table's, not a default
    checkpoint = out / "checkpoints" / "checkpoint-2"  # the head is adapted, but its frozen weight is not copied
    assert not any("base_layer" in key for key in safetensors_keys(checkpoint))
    resumed = train_mcq.main(train_argv(tiny_dir, out, *ood, "--eval_modes", "mean", "mc", "--save_steps", "2",
                                        "--resume_from_checkpoint", str(checkpoint)))  # at max_steps: reload, evaluate
    assert [(e["cell"], e["nll"], e["ece"]) for e in resumed["evaluations"]] == [
        (e["cell"], e["nll"], e["ece"]) for e in llmm["evaluations"]]
    assert resumed["width"]["history"] == history  # the checkpoint's log history keeps the steps before the resume
    again = test_mcq.main(["--runs", str(out), "--output_dir", str(tmp_path / "llmm-again")])  # mc: same draws
    assert [(e["cell"], e["nll"]) for e in again["evaluations"]] == [(e["cell"], e["nll"]) for e in llmm["evaluations"]]

    for seed in ("1", "2"):
        train_mcq.main(train_argv(tiny_dir, tmp_path / f"map-s{seed}", "--method", "map", "--seed", seed,
                                  "--eval_modes", "mean"))
    one = test_mcq.main(["--runs", str(tmp_path / "map-s1"), "--output_dir", str(tmp_path / "again")])
    first = json.loads((tmp_path / "map-s1" / "results.json").read_text())["evaluations"][0]
    assert one["evaluations"][0]["nll"] == pytest.approx(first["nll"], abs=1e-6)  # reloaded adapter, same answers
    from llmm.run import mcq_test

    load_member = mcq_test.load_member
    monkeypatch.setattr(mcq_test, "load_member", lambda settings: (time.sleep(0.5), load_member(settings))[1])
    pair = test_mcq.main(["--runs", str(tmp_path / "map-s1"), str(tmp_path / "map-s2"),
                          "--output_dir", str(tmp_path / "ensemble")])
    monkeypatch.undo()
    assert pair["evaluations"][0]["wall_time_s"] < 0.5  # the members' prediction time, not their loading
    assert pair["method"] == "ensemble" and pair["evaluations"][0]["eval_samples"] == 2 and pair["seed"] == "1+2"
    members = [json.loads((tmp_path / f"map-s{seed}" / "results.json").read_text()) for seed in ("1", "2")]
    for entry in pair["evaluations"]:  # each question's distribution: the average of its members' mean-mode ones
        alike = [next(e for e in m["evaluations"] if (e["eval_set"], e["mode"]) == (entry["eval_set"], "mean"))
                 for m in members]
        for index, question in enumerate(entry["questions"]):
            averaged = np.mean([e["questions"][index]["probs"] for e in alike], axis=0)
            np.testing.assert_allclose(question["probs"], averaged, atol=1e-6)
    with pytest.raises(ValueError, match=r"must share every setting but the seed: .* differ in \['K', 'method'"):
        test_mcq.main(["--runs", str(tmp_path / "map-s1"), str(out), "--output_dir", str(tmp_path / "mixed")])
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(ValueError, match="--mc_samples applies to one run; an ensemble averages its members' mean"):
        test_mcq.main(["--runs", str(tmp_path / "map-s1"), str(tmp_path / "map-s2"), "--output_dir",
                       str(tmp_path / "mixed"), "--mc_samples", "3"])  # it would be ignored
    assert one["evaluations"][0]["cell"] == first["cell"] and first["cell"]["eval_mode"] == "mean"  # same cell
    for name, config, says in (("k3", lambda c: c.replace('"k": 2', '"k": 3'), "has K=3, its run's settings.json says "
                                "K=2: they are not one run's"), ("cut", lambda c: c[:20], "is not valid JSON")):
        shutil.copytree(out, tmp_path / name, ignore=shutil.ignore_patterns(".llmm-run*", "checkpoints"))
        adapter_config = tmp_path / name / "adapter" / "adapter_config.json"
        adapter_config.write_text(config(adapter_config.read_text()))
        with pytest.raises(ValueError, match=says):  # before the output directory is made
            test_mcq.main(["--runs", str(tmp_path / name), "--output_dir", str(tmp_path / f"{name}-out")])
        assert not (tmp_path / f"{name}-out").exists()

    capsys.readouterr()
    runs = [str(tmp_path / name) for name in ("llmm", "map-s1", "map-s2", "ensemble")]
    text = mcq_table.main([*runs, "--output", str(tmp_path / "table.md")])
    assert "| llmm fp32 K2 mean |" in text and "| ensemble fp32 K0 M=2 |" in text and "arc_e->boolq" in text
    assert "BLoB (published, Llama-2-7B)" in text and "| map fp32 K0 mean | " in text
    map_accuracy = next(line for line in text.splitlines() if line.startswith("| map fp32 K0 mean | "))
    assert map_accuracy.split(" | ")[1].endswith(", n=2)")  # seeds 1 and 2 (own data orders) pooled in one cell
    assert "| llmm fp32 K2 mc N=2 | arc_e | " in text.split("Paired difference vs map")[1]  # seed 1 vs map seed 1
    assert "| ensemble fp32 K0 M=2 | arc_e | " in text.split("Paired difference vs map")[1]  # vs its 2 members
    assert "\n| llmm fp32 K2 | " in text.split("### Width of the learned distribution")[1]  # a run: no mode
    assert (tmp_path / "table.md").read_text() == text + "\n" + cli.TABLE_MARK  # marked: a re-run replaces it
    with pytest.raises(ValueError, match="two runs of one cell with seed 1: they cannot be pooled"):
        mcq_table.main([str(tmp_path)])  # map-s1 and its re-evaluation


@pytest.mark.parametrize("extra, problem", [
    (["--mc_samples", "0"], r"mc_samples = 0 is out of range"),
    (["--train_data", str(DATA / "bad_answer_key.jsonl")], "answer key 'E' is not among the choice labels"),
    (["--train_data", str(DATA / "no_choices.jsonl")], "the question has no choices"),
    (["--method", "map", "--K", "2"], "--method map trains plain LoRA factors"),
    (["--eval_modes", "dropout"], "eval mode 'dropout' needs dropout"),
    (["--ood", "nowhere"], "OOD set 'nowhere' is neither a task row"),
    (["--mc_dropout", "0.2"], "--mc_dropout 0.2 has no effect on this run: it applies only with --method mcdropout"),
    (["--eval_modes", "mean"], "--mc_samples 2 has no effect on this run: it applies only with an mc or dropout"),
    (["--entropy_floor", "0.001"], "--entropy_floor 0.001 has no effect on this run: it applies only with "
                                   "--entropy_weight > 0"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tiny_dir, tmp_path, capsys, extra, problem):
    from scripts import train_mcq

    out = tmp_path / "run"
    argv = train_argv(tiny_dir, out)
    argv = [a for i, a in enumerate(argv) if not (argv[i - 1] == "--train_data" and "--train_data" in extra)
            and not (a == "--train_data" and "--train_data" in extra)] + extra
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: train_mcq.main(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and problem in errors[0], errors
    assert not out.exists()


def test_bbcnews_articles_become_five_choice_questions(tmp_path):
    from scripts import prepare_mcq_bbcnews

    corpus = tmp_path / "corpus"
    topics = ["tech", "sports", "politics", "business", "entertainment"]
    for topic in topics:
        (corpus / topic).mkdir(parents=True)
        for i in range(10):
            (corpus / topic / f"{i}.txt").write_text(f"{topic} article number {i} " + "word " * 30)
    report = prepare_mcq_bbcnews.main(["--out_dir", str(tmp_path / "out"), "--corpus_dir", str(corpus),
                                       "--article_words", "5", "--seed", "0", "--max_train", "7", "--max_test", "4"])
    assert report["sizes"] == {"train": 7, "test": 4}
    test = load_mcq(str(tmp_path / "out" / "test.jsonl"))
    assert all(r["choices"] == sorted(topics) for r in test)
    for record in test:  # the answer is the article's own topic, and only article_words words are kept
        words = record["question"].split("? ", 1)[1].split()
        assert len(words) == 5 and words[0] == record["choices"][record["answer"]]


def test_a_variant_naming_its_method_is_that_method_run_for_skip_and_resume(tiny_dir, tmp_path, capsys):
    """--variant llmm is the run --method llmm makes (one cell): --skip_if_complete finds either complete under the
    other; a variant with settings of its own (llmm_pex) is another run, refused by name."""
    from scripts import train_mcq

    out = tmp_path / "llmm"
    assert train_mcq.main(train_argv(tiny_dir, out, "--method", "llmm", "--save_steps", "1")) is not None
    capsys.readouterr()
    assert train_mcq.main(train_argv(tiny_dir, out, "--variant", "llmm", "--skip_if_complete")) is None
    assert capsys.readouterr().out.strip() == f"done already: {out}"
    with pytest.raises(ValueError, match="is a complete run made with noise_per_example=False, this command says True"):
        train_mcq.main(train_argv(tiny_dir, out, "--variant", "llmm_pex", "--skip_if_complete"))
    resumed = train_mcq.main(train_argv(tiny_dir, out, "--variant", "llmm", "--max_steps", "3", "--skip_if_complete",
                                        "--resume_from_checkpoint"))  # the same run, trained on
    assert resumed["global_step"] == 3


def test_loftq_refuses_an_lm_head_tied_to_the_embeddings(tokenizer, tmp_path, capsys):
    from scripts import train_mcq

    model = tiny_causal_lm(tokenizer)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    argv = train_argv(tmp_path / "tied", tmp_path / "run", "--init", "loftq", "--bits", "4", "--loftq_iter", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda: train_mcq.main(argv))
    assert exit_info.value.code == 2 and "would quantize the input embeddings too" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- the table's seed statistics on hand-made results ------------------------------------------------------------------

RUN_CELL = {"task": "obqa", "method": "llmm", "backbone": "int8", "K": 2, "llmmscale": 400.0, "scaled_gradient": True,
            "lora_dropout": 0.0, "rank": 8, "learning_rate": 1e-4, "max_steps": 5000}
MAP_CELL = {**RUN_CELL, "method": "map", "K": 0}


def write_mcq_run(root, name, run_cell, seed, evaluations, width=None, questions=None):
    """A results.json as train_mcq writes it; ``evaluations``: {(eval set, mode, N): accuracy}, ECE = 1 - accuracy,
    NLL = 2 x ECE, Brier = ECE / 2 (so every metric's paired difference is known); ``questions``: the ids each
    evaluation saves its per-question records under (labels 0)."""
    entries = []
    for (eval_set, mode, n), accuracy in evaluations.items():
        entry = {"eval_set": eval_set, "where": f"{eval_set}.jsonl", "mode": mode, "eval_samples": n, "seed": seed,
                 "accuracy": accuracy, "ece": 1 - accuracy, "nll": 2 * (1 - accuracy), "brier": (1 - accuracy) / 2}
        if questions is not None:
            entry["questions"] = [{"id": ident, "label": 0, "probs": [0.5, 0.5]} for ident in questions]
        entries.append({**entry, "cell": evaluation_cell(run_cell, entry)})
    folder = root / name
    folder.mkdir(parents=True)
    results = {"task": run_cell["task"], "seed": seed, "cell": run_cell, "complete": True, "evaluations": entries}
    if width is not None:
        results["width"] = {"history": [{"step": 0}, {"step": 10, "A": {"median": width}, "B": {"median": width}}]}
    (folder / "results.json").write_text(json.dumps(results))


def table_rows(text, heading):
    """The rows (lists of cells, header left out) of the markdown table under ``heading``."""
    block = text.split(heading, 1)[1].split("\n\n", 2)[1]
    rows = [line.strip("| ").split(" | ") for line in block.splitlines()[2:]]
    return rows


def test_table_seed_statistics_and_paired_differences_against_map(tmp_path):
    from scripts import mcq_table

    map_accuracy = {1: 0.60, 2: 0.70, 3: 0.65, 4: 0.50}  # seed 4: map only, in its statistics, not in the pairing
    for seed, accuracy in map_accuracy.items():
        write_mcq_run(tmp_path, f"map-{seed}", MAP_CELL, seed, {("obqa", "mean", 1): accuracy,
                                                                ("arc_c", "mean", 1): accuracy - 0.2})
    for seed in (1, 2, 3):  # mean mode: map + 0.02 on every seed; mc: map + 0.01 * seed
        write_mcq_run(tmp_path, f"llmm-{seed}", RUN_CELL, seed,
                      {("obqa", "mean", 1): map_accuracy[seed] + 0.02, ("obqa", "mc", 10): map_accuracy[seed]
                       + 0.01 * seed, ("arc_c", "mean", 1): map_accuracy[seed] - 0.2}, width=0.1 * seed)
    text = mcq_table.main([str(tmp_path), "--published", str(REPO_ROOT / "configs" / "mcq_published.yaml")])
    accuracy = {r[0]: r[1:] for r in table_rows(text, "### Accuracy")}
    sd = np.std([62, 72, 67], ddof=1)
    assert accuracy["llmm int8 K2 mean"][0] == f"67.0 (67.0 ± {sd:.1f}, n=3)"  # columns: obqa, obqa->arc_c
    assert accuracy["map int8 K0 mean"][0] == f"62.5 (61.2 ± {np.std([60, 70, 65, 50], ddof=1):.1f}, n=4)"
    assert accuracy["llmm int8 K2 mc N=10"] == [f"68.0 (67.0 ± {np.std([61, 72, 68], ddof=1):.1f}, n=3)", "-"]
    paired = {(r[0], r[1]): r[2:] for r in table_rows(text, "### Paired difference vs map")}
    assert paired[("llmm int8 K2 mean", "obqa")] == ["+2.0 [+2.0, +2.0] (n=3)", "-2.0 [-2.0, -2.0] (n=3)",
                                                     "-0.040 [-0.040, -0.040] (n=3)", "-0.010 [-0.010, -0.010] (n=3)"]
    assert paired[("llmm int8 K2 mean", "obqa->arc_c")][0] == "+0.0 [+0.0, +0.0] (n=3)"
    mc = paired[("llmm int8 K2 mc N=10", "obqa")][0]  # differences 1, 2, 3 points against map's mean mode
    assert mc.startswith("+2.0 [") and mc.endswith("(n=3)") and set(paired) == {
        ("llmm int8 K2 mean", "obqa"), ("llmm int8 K2 mean", "obqa->arc_c"), ("llmm int8 K2 mc N=10", "obqa")}
    widths = {r[0]: r[1:] for r in table_rows(text, "### Width")}
    assert widths["llmm int8 K2"] == ["0.200 (0.200 ± 0.100, n=3) / 0.200 (0.200 ± 0.100, n=3)"]
    published = ["--published", str(REPO_ROOT / "configs" / "mcq_published.yaml")]
    assert mcq_table.main([str(tmp_path), "--baseline", "map", *published]) == text  # the default, given
    with pytest.raises(ValueError, match=r"--baseline 'mapp' is none of the runs' methods \(llmm, map\): pass one"):
        mcq_table.main([str(tmp_path), "--baseline", "mapp", *published])  # else every Δ cell would be empty


def test_table_pairs_the_deep_ensemble_with_each_of_its_members_on_the_same_questions(tmp_path):
    from scripts import mcq_table

    map_accuracy = {1: 0.60, 2: 0.70, 3: 0.65, 4: 0.90}  # seed 4: not a member, never in the ensemble's pairing
    for seed, accuracy in map_accuracy.items():
        write_mcq_run(tmp_path, f"map-{seed}", MAP_CELL, seed, {("obqa", "mean", 1): accuracy}, questions=["a", "b"])
    ensemble_cell = {**MAP_CELL, "method": "ensemble", "member_method": "map"}
    write_mcq_run(tmp_path, "ensemble", ensemble_cell, "1+2+3", {("obqa", "ensemble", 3): 0.72},
                  questions=["a", "b"])
    text = mcq_table.main([str(tmp_path)])
    paired = {(r[0], r[1]): r[2:] for r in table_rows(text, "### Paired difference vs map")}
    low, high = stats.bootstrap_interval([12.0, 2.0, 7.0])  # 72 - 60, 72 - 70, 72 - 65 points
    assert paired[("ensemble int8 K0 M=3", "obqa")][0] == f"+7.0 [{low:+.1f}, {high:+.1f}] (n=3)"
    assert paired[("ensemble int8 K0 M=3", "obqa")][2].startswith("-0.140 [")  # NLL: 2 x (0.28 - mean member 0.35)
    assert "Ensemble rows: the ensemble (one evaluation) minus each of its map members" in text

    for name, member_three, ensemble_seed in (("other-questions", ["a", "c"], "1+2+3"),
                                              ("missing-member", ["a", "b"], "1+2+9")):
        root = tmp_path / name
        for seed, accuracy in map_accuracy.items():
            write_mcq_run(root, f"map-{seed}", MAP_CELL, seed, {("obqa", "mean", 1): accuracy},
                          questions=member_three if seed == 3 else ["a", "b"])
        write_mcq_run(root, "ensemble", ensemble_cell, ensemble_seed, {("obqa", "ensemble", 3): 0.72},
                      questions=["a", "b"])
        text = mcq_table.main([str(root)])
        assert "| ensemble int8 K0 M=3 |" in text and "No row has a map run" in text, name  # shown, not paired


def test_table_never_pools_different_settings_and_pairs_only_the_same_backbone(tmp_path):
    from scripts import mcq_table

    write_mcq_run(tmp_path, "llmm-lr1", RUN_CELL, 1, {("obqa", "mean", 1): 0.6})
    write_mcq_run(tmp_path, "llmm-lr2", {**RUN_CELL, "learning_rate": 2e-4}, 1, {("obqa", "mean", 1): 0.8})
    write_mcq_run(tmp_path, "map-nf4", {**MAP_CELL, "backbone": "nf4"}, 1, {("obqa", "mean", 1): 0.5})
    text = mcq_table.main([str(tmp_path)])
    accuracy = {r[0]: r[1:] for r in table_rows(text, "### Accuracy")}
    assert accuracy["llmm int8 K2 mean (learning_rate=0.0001)"] == ["60.0 (n=1)"]  # two rows, n=1 each: not pooled
    assert accuracy["llmm int8 K2 mean (learning_rate=0.0002)"] == ["80.0 (n=1)"]
    assert "No row has a map run of the same task, backbone and settings" in text  # map is on nf4, not int8
    write_mcq_run(tmp_path, "llmm-lr1-again", RUN_CELL, 1, {("obqa", "mean", 1): 0.61})
    with pytest.raises(ValueError, match="two runs of one cell with seed 1: they cannot be pooled"):
        mcq_table.main([str(tmp_path)])


def test_table_rows_of_list_settings_and_a_variant_named_as_its_method(tmp_path):
    """Runs apart only in a list setting get a row each (no crash on a list in the label); --variant llmm is the
    cell --method llmm gives (one row, two seeds)."""
    from scripts import mcq_table

    write_mcq_run(tmp_path, "qv", {**RUN_CELL, "target_modules": ["q_proj", "v_proj"]}, 1, {("obqa", "mean", 1): 0.6})
    write_mcq_run(tmp_path, "q", {**RUN_CELL, "target_modules": ["q_proj"]}, 1, {("obqa", "mean", 1): 0.7})
    accuracy = {r[0]: r[1:] for r in table_rows(mcq_table.main([str(tmp_path)]), "### Accuracy")}
    assert len(accuracy) == 2 and sorted(accuracy.values()) == [["60.0 (n=1)"], ["70.0 (n=1)"]]
    root = tmp_path / "variant"
    write_mcq_run(root, "method", RUN_CELL, 1, {("obqa", "mean", 1): 0.6})
    write_mcq_run(root, "variant", {**RUN_CELL, "variant": "llmm"}, 2, {("obqa", "mean", 1): 0.8})
    accuracy = {r[0]: r[1:] for r in table_rows(mcq_table.main([str(root)]), "### Accuracy")}
    assert accuracy == {"llmm int8 K2 mean": ["70.0 (70.0 ± 14.1, n=2)"]}


def test_the_cost_ratio_is_to_map_on_the_same_backbone(tmp_path):
    from scripts import mcq_table

    for name, cell, seconds in (("map-int8", MAP_CELL, 1.0), ("map-nf4", {**MAP_CELL, "backbone": "nf4"}, 4.0),
                                ("llmm-nf4", {**RUN_CELL, "backbone": "nf4"}, 8.0)):
        write_mcq_run(tmp_path, name, cell, 1, {("obqa", "mean", 1): 0.6})
        path = tmp_path / name / "results.json"
        results = json.loads(path.read_text())
        results["evaluations"][0]["wall_time_s"] = seconds
        path.write_text(json.dumps(results))
    costs = {r[0]: r[1:] for r in table_rows(mcq_table.main([str(tmp_path)]), "### Cost")}
    assert costs["llmm nf4 K2 mean"][-1] == "8.0 (2.00x)" and costs["map int8 K0 mean"][-1] == "1.0 (1.00x)"


def test_seconds_per_step_of_a_resumed_run_count_only_what_it_trained():
    """A run resumed from checkpoint-2 timed steps 3-4 and their evaluations: train_runtime 4 s less 1 s of them. A
    fresh run's train_runtime also holds its evaluation at step 0 (eval_on_start)."""
    from llmm.run.mcq_report import run_costs

    history = [{"step": 0, "eval_runtime": 2.0}, {"step": 2, "eval_runtime": 1.0}, {"step": 3, "eval_runtime": 0.5},
               {"step": 4, "eval_runtime": 0.5}, {"step": 4, "train_runtime": 4.0}]
    resumed = run_costs({"history": history, "global_step": 4, "resumed_from": "run/checkpoints/checkpoint-2"})
    assert resumed["step_s"] == pytest.approx((4.0 - 1.0) / 2)
    history[-1]["train_runtime"] = 8.0
    assert run_costs({"history": history, "global_step": 4})["step_s"] == pytest.approx((8.0 - 4.0) / 4)


def test_table_refuses_results_without_cell_and_seed(tmp_path):
    from scripts import mcq_table

    old = tmp_path / "old" / "results.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"task": "obqa", "complete": True, "evaluations": [
        {"eval_set": "obqa", "mode": "mean", "eval_samples": 1, "accuracy": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5}]}))
    with pytest.raises(ValueError, match="has no 'cell'/'seed' record"):
        mcq_table.main([str(tmp_path)])


# --- adapters of the LM head: saved without the frozen head, reloaded exactly ------------------------------------------

MEAN_ADAPTER_IN_PLAIN_PEFT = """
import sys, numpy, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, ids, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    numpy.save(out, model(torch.from_numpy(numpy.load(ids))).logits.numpy())
assert not any(name == "llmm" or name.startswith("llmm.") for name in sys.modules)
"""


def safetensors_keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def test_lm_head_adapter_leaves_out_the_frozen_head_and_reloads_exactly(tokenizer, tmp_path):
    import os
    import subprocess
    import sys

    from llmm import export_mean_adapter, load_llmm_model, noise_mode, seed_noise
    from llmm.model import frozen_embedding_bases, save_llmm_adapter

    model = llmm_model(tokenizer, directions=0.3)  # q/v and lm_head, over tiny_causal_lm(seed 0)
    head_bytes = model.base_model.model.lm_head.base_layer.weight.numel() * 4
    assert frozen_embedding_bases(model) == ["base_model.model.lm_head.base_layer.weight"]
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    export_mean_adapter(model, str(tmp_path / "mean"))
    with pytest.warns(UserWarning, match="save_embedding_layers"):  # PEFT's "auto": the frozen head goes with it
        model.save_pretrained(tmp_path / "peft-default")
    assert any("lm_head.base_layer" in key for key in safetensors_keys(tmp_path / "peft-default"))
    for name in ("adapter", "mean"):
        keys = safetensors_keys(tmp_path / name)
        assert any("lm_head.lora_A" in key for key in keys) and not any("base_layer" in key for key in keys), name
        assert (tmp_path / name / "adapter_model.safetensors").stat().st_size < head_bytes, name

    batches, _ = question_batches(tokenizer)
    letters = letter_token_ids(tokenizer, 5)

    def distributions(peft_model):
        head = C.LetterHead(peft_model, letters)
        seed_noise(peft_model, 0)
        return C.predict(head, batches, "mean")[0], C.predict(head, batches, "mc", 3)[0]

    expected = distributions(model)
    assert np.abs(expected[1] - expected[0]).max() > 1e-3  # the directions matter, so mc checks Z too
    for name in ("adapter", "peft-default"):  # the new format and adapters saved before it
        got = distributions(load_llmm_model(tiny_causal_lm(tokenizer), str(tmp_path / name), k=2))
        for want, have in zip(expected, got):
            np.testing.assert_array_equal(have, want)

    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "base")
    ids = batches[0]["input_ids"][:, :8].numpy()
    np.save(tmp_path / "ids.npy", ids)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", MEAN_ADAPTER_IN_PLAIN_PEFT, str(tmp_path / "base"), str(tmp_path / "mean"),
                    str(tmp_path / "ids.npy"), str(tmp_path / "logits.npy")], check=True, env=env, cwd=tmp_path)
    with torch.no_grad(), noise_mode(model, "mean"):
        want = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-5)


def test_gradient_accumulation_averages_the_letter_loss(tiny_dir, tmp_path):
    """Batch 2 x accumulation 1 and batch 1 x accumulation 2 take the same step (K = 0: no noise; no dropout): the
    letter loss is a per-micro-batch mean, so the Trainer must average it over the accumulation steps, not sum it."""
    from scripts import train_mcq

    runs = {}
    for name, (batch, accumulation) in {"one": (2, 1), "two": (1, 2)}.items():
        runs[name] = train_mcq.main(train_argv(tiny_dir, tmp_path / name, "--method", "map", "--eval_modes", "mean",
                                               "--per_device_train_batch_size", str(batch),
                                               "--gradient_accumulation_steps", str(accumulation)))
    logs = {name: [h for h in run["history"] if "loss" in h] for name, run in runs.items()}
    assert len(logs["one"]) == len(logs["two"]) == 2
    for one, two in zip(logs["one"], logs["two"]):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)


def test_the_gpu_check_is_valid_bash_and_its_multiple_choice_part_refuses_without_cuda_in_one_line():
    import os
    import subprocess
    import sys

    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    done = subprocess.run([sys.executable, "-m", "benchmarks.mcq_gpu_check"], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and lines == ["error: no CUDA device here: the multiple-choice GPU check needs one "
                                              "(--cpu: a smoke run)"], done.stderr[-2000:]


def test_test_mcq_puts_a_full_precision_backbone_on_the_process_s_device(monkeypatch):
    """bitsandbytes backbones are placed when loaded; a dtype one is loaded on CPU, and test_mcq moves it to the
    process's device (a GPU where there is one), as the Trainer does in train_mcq."""
    from types import SimpleNamespace

    from llmm.run import causal_lm, mcq_test

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    monkeypatch.setattr(causal_lm, "load_backbone", lambda settings: (model, None))
    monkeypatch.setattr(mcq_test, "load_llmm_model", lambda backbone, path, k: backbone)
    monkeypatch.setattr(mcq_test, "PartialState", lambda: SimpleNamespace(device=torch.device("meta")))
    settings = SimpleNamespace(load_in_8bit=False, load_in_4bit=False, run="run", K=2)
    assert next(mcq_test.load_member(settings)[0].parameters()).device.type == "meta"
    quantized = SimpleNamespace(load_in_8bit=True, load_in_4bit=False, run="run", K=2)
    monkeypatch.setattr(causal_lm, "load_backbone", lambda settings: (LlamaForCausalLM(model.config), None))
    assert next(mcq_test.load_member(quantized)[0].parameters()).device.type == "cpu"  # left where it was loaded


def test_an_eval_set_typed_relative_is_recorded_by_its_real_path(tiny_dir, tmp_path, monkeypatch):
    """--test_data / --ood typed relative to where train_mcq runs: each evaluation's where (and cell) is the file's real
    path, as test_mcq's ensemble records it, so the two pool in one table row."""
    from scripts import train_mcq

    argv = [*train_argv(tiny_dir, tmp_path / "run", "--method", "map"), "--train_data", "arc.jsonl", "--test_data",
            "arc.jsonl", "--ood", "obqa.jsonl"]  # the last of a flag given twice wins
    monkeypatch.chdir(DATA)
    results = train_mcq.main(argv)
    wheres = {e["eval_set"]: (e["where"], e["cell"]["eval_where"]) for e in results["evaluations"]}
    assert wheres == {"arc_e": (str(DATA / "arc.jsonl"),) * 2, "obqa": (str(DATA / "obqa.jsonl"),) * 2}


def test_table_pairs_each_row_with_its_own_baseline_in_cost_and_shows_unpaired_rows():
    """Two map cells (max_steps 2 and 3): each llmm row's cost ratio is to the map row it pairs with, not the last
    map read; a row no map run matches stays in the paired table with "-"."""
    from llmm.run import mcq_report

    def record(method, max_steps, seed, step_s, eval_mode="mean"):
        cell = {"method": method, "task": "arc_e", "eval_set": "arc_e", "backbone": "fp32", "K": 0 if method == "map"
                else 2, "eval_mode": eval_mode, "eval_samples": 1, "max_steps": max_steps, "learning_rate": 1e-4}
        return {"path": f"{method}{max_steps}-{seed}", "seed": seed, "cell": cell, "questions": None,
                "costs": {"step_s": step_s, "test_s": 1.0},
                "metrics": {"accuracy": 50.0 + seed, "ece": 10.0, "nll": 1.0, "brier": 0.5}}

    records = [record("map", 2, s, 1.0) for s in (1, 2)] + [record("map", 3, s, 2.0) for s in (1, 2)]
    records += [record("llmm", 2, s, 1.5) for s in (1, 2)] + [record("llmm", 5, s, 3.0) for s in (1, 2)]
    costs = "\n".join(mcq_report.cost_table(records, "map"))
    assert "1.50 (1.50x)" in costs and "3.00 |" in costs and "3.00 (" not in costs  # max_steps 5: no map pair
    paired = "\n".join(mcq_report.paired_table(mcq_report.build(records, "map"), "map"))
    rows = [line for line in paired.splitlines() if line.startswith("| llmm")]
    assert len(rows) == 2 and any(line.count("| - ") == 4 for line in rows)  # the unpaired row, shown with "-"
