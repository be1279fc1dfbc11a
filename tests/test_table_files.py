"""The YAML files the entry points read (configs/ tables, the per-model_type rows, a table's --published file): bad
YAML, a missing or unknown block, a value of the wrong type are one ``error:`` line naming the file and the fix."""

import re
import types

import pytest
from conftest import REPO_ROOT
from test_mcq import MAP_CELL, write_mcq_run

from llmm.run import cli, glue_report, tables
from scripts import mcq_table, train_gsm8k

CONFIGS = REPO_ROOT / "configs"
KEYED = sorted(p for p in CONFIGS.glob("*.yaml") if "rows:" in p.read_text())


def one_error_line(capsys, main) -> str:
    """The one ``error:`` line (exit code 2) that run_main prints for ``main``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def gsm8k_with(tmp_path, old: str, new: str):
    """configs/gsm8k.yaml with ``old`` replaced by ``new``, written under tmp_path."""
    text = (CONFIGS / "gsm8k.yaml").read_text()
    assert old in text
    path = tmp_path / "gsm8k.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("text, line", [("rows:\n  - {method: blob, bogus: 1\n", r"line 3, column 1"),
                                        ("keys: [task]\nrows:\n  - task: [a\n    source: x\n", r"line 4")])
def test_malformed_yaml_names_the_file_the_line_and_the_fix(tmp_path, text, line):
    path = tmp_path / "table.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"table.yaml, {line}.*malformed YAML.*: fix the syntax"):
        tables.read_table(path)


def test_malformed_yaml_in_a_table_is_one_error_line_of_the_entry_point(tmp_path, capsys, monkeypatch):
    path = gsm8k_with(tmp_path, "weight_decay: ", "weight_decay: [")
    monkeypatch.setattr(train_gsm8k, "TABLE", path)
    error = one_error_line(capsys, lambda: train_gsm8k.main(["--output_dir", str(tmp_path / "out")]))
    assert re.search(r"gsm8k.yaml, line \d+, column \d+: malformed YAML \(.*flow sequence at line \d+\): fix the "
                     "syntax", error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k.yaml"]  # nothing written


@pytest.mark.parametrize("text, problem", [
    ("", r"empty.yaml holds nothing: it must hold a YAML mapping"),
    ("- a\n- b\n", r"empty.yaml holds \['a', 'b'\]: it must hold a YAML mapping"),
    ("defaults: {rank: 8}\nrows: []\n", r"empty.yaml has no 'keys': it must hold keys and rows"),
    ("keys: [task]\ndefaults: {rank: 8}\n", r"empty.yaml has no 'rows': it must hold keys and rows"),
    ("keys: task\nrows: []\n", r"empty.yaml: keys is 'task': it must be a list of names"),
    ("keys: [task]\nrows: 5\n", r"empty.yaml: rows is 5: it must be a list of mappings"),
    ("keys: [task]\nrows: [{task: a, source: x}, 5]\n", r"empty.yaml: rows holds 5: it must be a list of mappings"),
    ("keys: [task]\ndefaults:\nrows: []\n", r"empty.yaml: defaults is None: it must be a mapping"),
])
def test_an_empty_table_or_a_missing_or_mistyped_block_names_what_the_file_must_hold(tmp_path, text, problem):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        tables.read_table(path)


def test_an_unknown_top_level_block_is_refused_with_the_closest_and_the_repo_tables_pass(tmp_path):
    for path in KEYED:  # every block they hold is known (published figures: rows other than settings)
        (tables.read_keyed if path.name == "glue_reference.yaml" else tables.read_table)(path)
    path = tmp_path / "gsm8k.yaml"
    path.write_text((CONFIGS / "gsm8k.yaml").read_text() + "extra_block: 1\n")
    with pytest.raises(ValueError, match=r"gsm8k.yaml has an unknown key 'extra_block': fix or remove it \(known: "
                                         r"columns, defaults, keys, rows, variants\)"):
        tables.read_table(path)
    with pytest.raises(ValueError, match=r"gsm8k.yaml has an unknown key 'default'.*did you mean 'defaults'\?"):
        tables.read_table(gsm8k_with(tmp_path, "\ndefaults:", "\ndefault:"))


@pytest.mark.parametrize("file, fix", [("targets.yaml", tables.default_targets),
                                       ("embedding_targets.yaml", tables.default_embedding_targets)])
@pytest.mark.parametrize("value", ["5", "q_proj", "[q_proj, 5]"])
def test_a_model_type_row_that_is_not_a_list_of_module_names_is_one_error(tmp_path, monkeypatch, file, fix, value):
    (tmp_path / file).write_text(f"llama: {value}\n")
    monkeypatch.setattr(tables, "CONFIGS", tmp_path)
    with pytest.raises(ValueError, match=rf"configs/{file}: row 'llama' is .*: it must be a list of module names"):
        fix(types.SimpleNamespace(model_type="llama"))


@pytest.mark.parametrize("text, problem", [
    ("foo: bar\n", r"--published .*published.yaml. has an unknown key 'foo'"),
    ("rows: 5\n", r"--published .*published.yaml. has an unknown key 'rows'"),
    ("tasks: [arc_e]\n", r"--published .*published.yaml. has no 'references': it must hold tasks and references"),
    ("tasks: [arc_e]\nreferences: 5\n", r"references is 5: it must be a list of mappings"),
    ("tasks: arc_e\nreferences: []\n", r"tasks is 'arc_e': it must be a list of names"),
    ("tasks: [arc_e]\nreferences: [{label: x, eec: [1.0]}]\n",
     r"references\[0\] has an unknown key 'eec': fix or remove it \(did you mean 'ece'\?\)"),
    ("tasks: [arc_e, obqa]\nreferences: [{label: x, ece: [1.0]}]\n",
     r"references\[0\] has ece \[1.0\]: it must be a list of 2 numbers, one per task"),
    ("tasks: [arc_e]\nreferences: [{ece: [1.0]}]\n", r"references\[0\] has label None: give each reference a label"),
])
def test_a_bad_published_file_of_the_mcq_table_is_one_error_line(tmp_path, capsys, text, problem):
    write_mcq_run(tmp_path / "runs", "map-1", MAP_CELL, 1, {("obqa", "mean", 1): 0.6})
    published = tmp_path / "published.yaml"
    published.write_text(text)
    argv = [str(tmp_path / "runs"), "--published", str(published), "--output", str(tmp_path / "table.md")]
    error = one_error_line(capsys, lambda: mcq_table.main(argv))
    assert re.search(problem, error), error
    assert not (tmp_path / "table.md").exists()


def test_a_published_directory_is_named_a_directory(tmp_path, capsys):
    write_mcq_run(tmp_path / "runs", "map-1", MAP_CELL, 1, {("obqa", "mean", 1): 0.6})
    error = one_error_line(capsys, lambda: mcq_table.main([str(tmp_path / "runs"), "--published", str(tmp_path)]))
    assert "is a directory, not a file: pass the YAML file" in error, error


def test_the_glue_reference_file_is_checked_as_a_keyed_table(tmp_path, monkeypatch):
    path = tmp_path / "glue_reference.yaml"
    path.write_text((CONFIGS / "glue_reference.yaml").read_text() + "row: []\n")
    monkeypatch.setattr(glue_report, "REFERENCE", path)
    with pytest.raises(ValueError, match=r"glue_reference.yaml has an unknown key 'row'.*did you mean 'rows'\?"):
        glue_report.markdown([], "loftq")
