"""Reliability, the library's part: outputs kept apart from inputs, --overwrite replacing only what llmm wrote,
multiple-choice record checks, non-finite metrics in the statistics, independent network seeds, per-question
records that recompute a run's metrics."""

import json
import math
import re

import numpy as np
import pytest

from llmm import outdirs as U
from llmm import outdirs, stats
from llmm.streams import MAX_SEED, check_seed, network_seeds
from llmm.tasks import calibration as C
from llmm.tasks.mcq import load_mcq, normalise, question_ids
from test_safety import tree


# --- no output is, holds or lies inside an input ----------------------------------------------------------------------

@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "x"
    (folder / "adapter").mkdir(parents=True)
    (folder / "settings.json").write_text("{}")
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("output, relation", [
    ("runs/x", "is"), ("runs/x/", "is"), ("./runs/../runs/x", "is"), ("runs/x/adapter", "lies inside"),
    ("runs", "contains"), (".", "contains"),
])
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(run, output, relation):
    with pytest.raises(ValueError, match=rf"^--output_dir '{output}' {relation} --runs 'runs/x': .*choose an "
                                         r"--output_dir outside its inputs$"):
        outdirs.check_outputs_apart({"--output_dir": output}, {"--runs": ["runs/x"]})
    outdirs.check_outputs_apart({"--output_dir": "runs/y"}, {"--runs": ["runs/x"]})  # a sibling is fine


def test_paths_are_compared_resolved_home_and_symlinks(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "link").symlink_to(run)
    for output in ("~/runs/x", str(tmp_path / "link"), "link/adapter"):
        with pytest.raises(ValueError, match="--output_dir .* --runs"):
            outdirs.check_outputs_apart({"--output_dir": output}, {"--runs": str(run)})
    with pytest.raises(ValueError, match="--output_dir 'runs' contains --train_data 'runs/x/settings.json'"):
        outdirs.check_outputs_apart({"--output_dir": "runs"}, {"--train_data": "runs/x/settings.json"})
    outdirs.check_outputs_apart({"--output_dir": "runs/x"}, {"--model_name_or_path": "meta-llama/Llama-2-7b-hf",
                                                             "--ood": None})  # a hub id: nothing local to lose


def test_a_single_output_file_may_sit_beside_its_inputs_but_never_over_them(run):
    files = ("--output",)
    outdirs.check_outputs_apart({"--output": "runs/table.md"}, {"paths": ["runs"]}, files=files)
    outdirs.check_outputs_apart({"--output": "runs/x/eval/mean.json"}, {"RUN_DIR": "runs/x"}, files=files)
    for output in ("runs/x/results.json", "runs/x/settings.json", "runs/x/adapter/notes.md"):
        with pytest.raises(ValueError, match="lies inside"):
            outdirs.check_outputs_apart({"--output": output}, {"paths": ["runs/x"]}, files=files)
    for output in (".", "runs", "runs/"):
        with pytest.raises(ValueError, match="is a directory, not a file"):
            outdirs.check_output_file(output)


def test_tables_refuse_to_write_over_a_runs_results(run, capsys):
    from scripts import lm_table, mcq_table
    from test_safety import cli

    (run / "results.json").write_text(json.dumps({"task": "gsm8k", "accuracy": 0.5, "seed": 1, "cell": {}}))
    before = tree(run)
    for main in (mcq_table.main, lm_table.main):
        code, line = cli(main, ["runs/x", "--output", "runs/x/results.json"], capsys)
        assert code == 2 and "--output 'runs/x/results.json' lies inside paths 'runs/x'" in line
        code, line = cli(main, ["runs/x", "--output", "."], capsys)
        assert code == 2 and "--output '.' is a directory, not a file" in line
    assert tree(run) == before


# --- --overwrite replaces only what llmm wrote ---------------------------------------------------------------------

def llmm_run(folder):
    for name in ("settings.json", "results.json", "adapter/adapter_config.json", "checkpoints/checkpoint-2/trainer_state.json",
                 "curves.png", outdirs.RUN_MARKER):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize("foreign, named", [
    ("my_notes.txt", "'my_notes.txt'"), ("user_data/table.csv", "'user_data/'"), ("paper.tex", "'paper.tex'"),
])
def test_overwrite_refuses_a_directory_holding_a_users_files_naming_them(tmp_path, foreign, named):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)  # the run directory sits in a git repository
    target = llmm_run(repo / "results")
    (target / foreign).parent.mkdir(parents=True, exist_ok=True)
    (target / foreign).write_text("the user's")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match=rf"refusing to replace .*--overwrite.*it holds {named}, which llmm "
                                              "did not write"):
        U.prepare_output_dir(target, overwrite=True)
    assert tree(tmp_path) == before
    (target / foreign).unlink()
    if (target / foreign).parent != target:
        (target / foreign).parent.rmdir()
    U.prepare_output_dir(target, overwrite=True)  # only llmm's files: replaced
    assert [p.name for p in target.iterdir()] == [outdirs.RUN_MARKER]


def test_overwrite_of_a_symlinked_output_dir_names_the_link(tmp_path):
    real = llmm_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    before = tree(real)
    with pytest.raises(FileExistsError, match=rf"refusing to replace '{link}' \(--overwrite\): it is a symbolic "
                                              rf"link \(to '{real}'\)"):
        U.prepare_output_dir(link, overwrite=True)
    assert tree(real) == before and link.is_symlink()


# --- multiple-choice records ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, problem", [
    ({"id": "q7", "question": "q", "choices": ["a", "a", "b"], "answer": 0},
     r"field 'choices' repeats a choice: 'a' \(choice 1\) and 'a' \(choice 2\)"),
    ({"id": "q7", "question": "q", "choices": ["Sport", "sport ", "b"], "answer": 0},
     r"field 'choices' repeats a choice: 'Sport' \(choice 1\) and 'sport ' \(choice 2\)"),
    ({"id": "q7", "question_stem": "q", "answerKey": "A"}, "the question has no choices"),
    ({"id": "q7", "question": "q", "choices": ["a", None, "b"], "answer": 0}, r"field 'choices', choice 2 is None"),
    ({"id": "q7", "question": None, "choices": ["a", "b"], "answer": 0}, r"field 'question' is None"),
    ({"id": "q7", "question": "  ", "choices": ["a", "b"], "answer": 0}, r"field 'question' is '  '"),
    ({"id": "q7", "question": None, "passage": "p", "answer": True}, r"field 'question' is None"),
    ({"id": "q7", "sentence": "s _", "option1": "a", "option2": "A", "answer": "1"}, "repeats a choice"),
])
def test_bad_choice_or_question_is_one_error_naming_file_record_and_field(tmp_path, record, problem):
    path = tmp_path / "data.jsonl"
    good = {"question": "fine", "choices": ["x", "y"], "answer": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}, record 2 \(id 'q7'\): .*{problem}"):
        load_mcq(str(path))
    assert normalise({"question": "q", "choices": [1, 2.5], "answer": 0})["choices"] == ["1", "2.5"]  # numbers: text


def test_question_ids_follow_load_order(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 1}\n'
                    '{"question": "r", "choices": ["x", "y"], "answer": 0}\n')
    assert question_ids(str(path)) == ["a", "2"] and len(load_mcq(str(path))) == 2


# --- per-question records recompute the metrics -----------------------------------------------------------------------

def test_question_records_recompute_every_metric_exactly():
    rng = np.random.default_rng(0)
    n_choices = np.array([2, 4, 3, 5, 4, 2])
    logits = rng.normal(size=(6, 5))
    logits[np.arange(5)[None, :] >= n_choices[:, None]] = -np.inf
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([1, 3, 0, 4, 2, 0])
    records = C.question_records(probs, labels, n_choices, [f"q{i}" for i in range(6)])
    assert [len(r["probs"]) for r in records] == list(n_choices) and records[3]["id"] == "q3"
    assert json.loads(json.dumps(records)) == records  # what results.json holds
    assert C.evaluate_questions(records) == C.evaluate(probs, labels)
    with pytest.raises(ValueError, match="one of each per question"):
        C.question_records(probs, labels, n_choices, ["q0"])


# --- non-finite and malformed metrics --------------------------------------------------------------------------------

def test_non_finite_values_are_shown_and_left_out_of_the_statistics():
    summary = stats.summarize([60.0, math.inf, 62.0])
    assert summary == {"n": 2, "median": 61.0, "mean": 61.0, "sd": pytest.approx(math.sqrt(2)), "left_out": [math.inf]}
    assert stats.format_summary(summary) == "61.0 (61.0 ± 1.4, n=2; 1 not finite left out: inf)"
    assert stats.format_summary(stats.summarize([math.inf, math.nan])) == "inf, nan (not finite)"
    difference = stats.paired_difference({1: 2.0, 2: math.nan, 3: 4.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert difference["n"] == 2 and difference["mean"] == 2.0 and difference["left_out"] == [2]
    assert "1 seed(s) with a non-finite value left out: 2" in stats.format_difference(difference)


@pytest.mark.parametrize("value", [None, "0.5", True, [1]])
def test_a_metric_that_is_not_a_number_names_the_run(value):
    with pytest.raises(ValueError, match=rf"^runs/x/results.json: metric 'nll' is {re.escape(repr(value))}, not a number"):
        stats.metric_value(value, "runs/x/results.json", "nll")
    with pytest.raises(ValueError, match=r"^runs/x/results.json: 'evaluations' is str"):
        stats.check_entries("mean", "runs/x/results.json")
    assert math.isinf(stats.metric_value(math.inf, "f", "eval_perplexity"))


# --- independent streams ----------------------------------------------------------------------------------------------

def test_network_seeds_are_independent_across_seeds_and_stable():
    one, two = network_seeds(1, 3), network_seeds(2, 3)
    assert not set(one) & set(two) and len(set(one)) == 3  # seed + d would share two of three networks
    assert network_seeds(1, 2) == one[:2] and network_seeds(1, 3) == one
    assert all(0 <= s < 2**63 for s in one + network_seeds(2**40, 2))
    expected = int(np.random.SeedSequence(1).spawn(3)[1].generate_state(1, dtype=np.uint64)[0]) >> 1
    assert one[1] == expected


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 1.5, True, "3"])
def test_a_seed_out_of_range_names_the_flag(seed):
    with pytest.raises(ValueError, match=r"^--seed must be an integer in 0\.\.4294967295"):
        check_seed(seed)
    assert check_seed(MAX_SEED) == MAX_SEED and check_seed(0) == 0
