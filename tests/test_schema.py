"""llmm.run.schema: every field of every block, walked. Its flag exists on the entry points of its family, every table
value is in its range, an out-of-range value on the command line is one ``error:`` line (exit code 2, nothing
written), and a tiny run records it in settings.json and, where it defines the cell, in results.json's cell."""

import dataclasses
import importlib
import json
import re

import pytest
from conftest import REPO_ROOT

from llmm.run import schema, tables
from llmm.run.cli import run_main
from scripts import test_gsm8k, train_glue, train_gsm8k, train_mcq, train_nlg

DATA = REPO_ROOT / "tests" / "data"
TABLES = {"causal_lm": ["gsm8k.yaml", "nlg.yaml"], "glue": ["glue.yaml"], "mcq": ["mcq.yaml"],
          "gsm8k_test": ["gsm8k_test.yaml"]}
ENTRY = {"causal_lm": train_gsm8k, "glue": train_glue, "mcq": train_mcq, "gsm8k_test": test_gsm8k}
# Command lines that get as far as the settings checks (nothing is loaded before them).
BASE = {
    "causal_lm": ["--model_name_or_path", "no/such-model", "--init", "lora", "--data", str(DATA / "gsm8k.jsonl")],
    "glue": ["--task", "cola", "--quant", "nf", "--rank", "16", "--data_dir", str(DATA / "glue" / "CoLA")],
    "mcq": ["--task", "arc_e", "--model_name_or_path", "no/such-model", "--train_data", str(DATA / "mcq" / "arc.jsonl"),
            "--load_in_8bit", "false"],
    "gsm8k_test": ["--adapter", "no/such/adapter"],
}
def family_fields(family):
    return [(name, f) for name, f in schema.fields_of(*schema.FAMILY_BLOCKS[family]).items()]


def out_of_range(f):
    """A value the field refuses, as a command-line string (None: no such value, e.g. a free string)."""
    meta, kind = f.metadata, schema.kind_of(f)
    if meta["choices"] is not None:
        numbers = [c for c in meta["choices"] if isinstance(c, (int, float)) and not isinstance(c, bool)]
        return None if kind is bool else str(max(numbers) + 1) if numbers else "not-a-choice"
    if meta["low"] is not None:
        return str(meta["low"] if meta["low_open"] else meta["low"] - 1)
    if meta["high"] is not None:
        return str(meta["high"] + 1)
    if meta["nonempty"]:
        return ""
    return None


@pytest.mark.parametrize("family, name", [(family, name) for family in sorted(TABLES) for name in TABLES[family]])
def test_every_field_has_a_flag_and_the_tables_values_are_in_range(family, name, capsys):
    blocks = schema.FAMILY_BLOCKS[family]
    table = tables.read_table(tables.CONFIGS / name, blocks)  # an unknown name or a bad value raises
    for row in [table.get("defaults", {}), *table["rows"]]:
        assert [k for k, v in row.items() if schema.setting_error(k, v, blocks)] == []
    with pytest.raises(SystemExit):
        (train_nlg if name == "nlg.yaml" else ENTRY[family]).main(["--help"])
    flags = set(re.findall(r"--(\w+)", capsys.readouterr().out))
    named = {*table.get("defaults", {}), *(k for r in table["rows"] for k in r)}
    plumbing = {n for n, f in family_fields(family) if f.metadata["role"] == schema.RUN}
    expected = (named | plumbing) & {n for n, _ in family_fields(family)}
    assert sorted(expected - flags) == []


@pytest.mark.parametrize("family", ["causal_lm", "glue", "mcq"])
def test_every_applies_condition_reads_settings_its_family_has(family):
    """A field's ``applies`` (when a flag has an effect) is a test on the family's resolved settings: it must run on
    each of the family's tables (a condition naming a setting the family lacks would fail every run that gives it)."""
    run = {"causal_lm": schema.CausalLMRun, "glue": schema.GlueRun, "mcq": schema.McqRun}[family]
    conditions = [(name, f.metadata["applies"]) for name, f in family_fields(family) if f.metadata["applies"]]
    assert conditions
    for name in TABLES[family]:
        settings = run.of(tables.read_yaml(tables.CONFIGS / name)["defaults"])
        if isinstance(settings.get("eval_modes"), dict):
            settings.eval_modes = settings.eval_modes[settings.method]
        for setting_name, applies in conditions:
            assert applies.test(settings) in (True, False), setting_name


def test_a_value_per_method_is_range_checked_when_the_table_is_read(tmp_path):
    """A per-method value ({method: value}) is checked value by value, as a plain one is."""
    table = tmp_path / "mcq.yaml"
    table.write_text("keys: [task]\ndefaults: {eval_modes: {map: [mean], llmm: [mean, mc]}}\nrows:\n  - {task: x}\n")
    tables.read_table(table, schema.FAMILY_BLOCKS["mcq"])
    table.write_text("keys: [task]\nrows:\n  - {task: x, learning_rate: {llmm: -1.0}}\n")
    with pytest.raises(ValueError, match=r"mcq.yaml: \{'task': 'x'\} has learning_rate = \{'llmm': -1.0\}"):
        tables.read_table(table, schema.FAMILY_BLOCKS["mcq"])


def test_a_table_s_slips_are_one_line_each(tmp_path):
    """A key named twice (YAML keeps the last), 1e-4 (YAML reads text), another case of a field's name."""
    table = tmp_path / "gsm8k.yaml"
    table.write_text("keys: [model]\ndefaults:\n  learning_rate: 1.0e-4\n  learning_rate: 2.0e-4\nrows: []\n")
    with pytest.raises(ValueError, match=r"gsm8k.yaml, line 3: learning_rate named twice in one mapping: keep one"):
        tables.read_table(table, schema.FAMILY_BLOCKS["causal_lm"])
    table.write_text("keys: [model]\ndefaults: {learning_rate: 1e-4}\nrows: []\n")
    with pytest.raises(ValueError, match=r"learning_rate = '1e-4': .*YAML reads 1e-4 as text: write it with a dot"):
        tables.read_table(table, schema.FAMILY_BLOCKS["causal_lm"])
    table.write_text("keys: [model]\ndefaults: {k: 3}\nrows: []\n")
    with pytest.raises(ValueError, match=r"unknown setting 'k': did you mean 'K'\?"):
        tables.read_table(table, schema.FAMILY_BLOCKS["causal_lm"])


def flags_of(entry, capsys) -> set[str]:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        entry.main(["--help"])
    return set(re.findall(r"--(\w+)", capsys.readouterr().out))


ENTRY_POINTS = sorted(path.stem for path in (REPO_ROOT / "scripts").glob("*.py") if path.stem != "__init__")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_settings_flag_of_every_entry_point_is_made_from_its_field(entry, capsys, monkeypatch):
    """A flag that names a setting carries its field's help (so its type and range are the field's too): no entry
    point writes such a flag by hand."""
    monkeypatch.setenv("COLUMNS", "2000")  # the help unwrapped: as the field says it
    capsys.readouterr()
    with pytest.raises(SystemExit):
        importlib.import_module(f"scripts.{entry}").main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    lines = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options) if entry.strip()}
    assert "-h," in lines and "--debug" in lines  # run_main's: the traceback instead of the one error line
    for flag, text in lines.items():
        helps = [" ".join(f.metadata["help"].split()) for block in schema.BLOCKS for f in dataclasses.fields(block)
                 if f.name == flag[2:]]
        if helps and "old name of --" not in text:
            assert any(help_text in text for help_text in helps), flag


@pytest.mark.parametrize("family, name", [(family, name) for family in sorted(TABLES) for name, f in
                                          family_fields(family) if out_of_range(f) is not None])
def test_an_out_of_range_value_is_one_error_line_and_writes_nothing(family, name, tmp_path, capsys):
    f = schema.fields_of(*schema.FAMILY_BLOCKS[family])[name]
    if name not in flags_of(ENTRY[family], capsys):
        pytest.skip(f"{ENTRY[family].__name__} has no --{name}: its tables do not use it")
    if any(name in tables.read_yaml(tables.CONFIGS / t)["keys"] for t in TABLES[family]):
        pytest.skip(f"--{name} names a table row: argparse lists the rows")
    out = tmp_path / "out"
    argv = [*BASE[family], "--output_dir", str(out), f"--{name}", out_of_range(f)]
    if name == "output_dir":
        argv = [*BASE[family], "--output_dir", ""]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: ENTRY[family].main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"{name} =" in lines[0] or f"--{name}" in lines[0], lines  # refused for its range, not a later fault
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(schema.BbcNewsSettings)
                                  if out_of_range(f) is not None])
def test_the_data_preparation_flags_are_fields_checked_in_one_error_line(name, tmp_path, capsys):
    from scripts import prepare_mcq_bbcnews

    out = tmp_path / "out"
    argv = {"out_dir": str(out), "article_words": "5", "max_train": "3", "max_test": "3"}
    argv[name] = out_of_range(schema.BbcNewsSettings.__dataclass_fields__[name])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: prepare_mcq_bbcnews.main([arg for key, value in argv.items() for arg in (f"--{key}", value)]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and name in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def tiny_runs(tmp_path):
    """(family, settings.json, results.json's cell) of one tiny run per training family."""
    from test_glue import save_tiny_model
    from test_llama_scripts import save_tiny_llama
    from test_mcq import make_tokenizer, tiny_causal_lm

    llama = save_tiny_llama(tmp_path / "llama")
    fast = ["--max_steps", "1", "--logging_steps", "1"]
    train_gsm8k.main(["--model_name_or_path", str(llama), "--rank", "4", "--init", "lora", "--data",
                      str(DATA / "gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "2", "--load_in_4bit",
                      "false", "--dtype", "float32", "--output_dir", str(tmp_path / "gsm8k"), *fast])
    train_glue.main(["--task", "cola", "--quant", "nf", "--rank", "16", "--bits", "4", "--model",
                     save_tiny_model(tmp_path / "deberta"), "--data_dir", str(DATA / "glue" / "CoLA"),
                     "--output_dir", str(tmp_path / "glue"), "--per_device_train_batch_size", "4", "--max_steps", "1"])
    tokenizer = make_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    train_mcq.main(["--task", "arc_e", "--model_name_or_path", str(tmp_path / "tiny"), "--train_data",
                    str(DATA / "mcq" / "arc.jsonl"), "--test_data", str(DATA / "mcq" / "arc.jsonl"), "--load_in_8bit",
                    "false", "--dtype", "float32", "--eval_steps", "1", "--eval_modes", "mean",
                    "--output_dir", str(tmp_path / "mcq"), *fast])
    for family, folder in (("causal_lm", "gsm8k"), ("glue", "glue"), ("mcq", "mcq")):
        settings = json.loads((tmp_path / folder / "settings.json").read_text())
        yield family, settings, json.loads((tmp_path / folder / "results.json").read_text())["cell"]


def test_every_field_a_run_resolves_is_recorded_and_the_cell_follows_its_role(tmp_path):
    for family, settings, cell in tiny_runs(tmp_path):
        named = set(tables.read_yaml(tables.CONFIGS / TABLES[family][0]).get("defaults", {}))  # every run has them
        for name, f in family_fields(family):
            role = f.metadata["role"]
            if name not in named and role != schema.RUN or f.default is None and name not in named:
                continue
            assert name in settings, (family, name)
            if role in (schema.RUN, schema.EVAL):  # evaluation plumbing: each evaluation's cell says what it used
                assert name not in cell, (family, name)
            else:
                assert name in cell and cell[name] == settings[name], (family, name)


def test_adding_a_numeric_setting_is_one_field(monkeypatch, capsys):
    """A new field with a range: its flag, its check and its table validation follow with no other change."""
    @dataclasses.dataclass
    class Extra(schema.TrainingSettings):
        entropy_weight: float = schema.setting(0.0, "weight of an entropy term", low=0)

    blocks = (*schema.FAMILY_BLOCKS["glue"][:2], Extra, schema.GlueSettings)
    assert schema.setting_error("entropy_weight", -1.0, blocks) == "a finite number >= 0"
    assert schema.setting_error("entropy_weight", 0.5, blocks) is None
    table = {"keys": ["task"], "defaults": {"entropy_weight": 0.1}, "rows": [{"task": "cola"}]}
    parser = __import__("argparse").ArgumentParser()
    tables.add_setting_flags(parser, table, blocks)
    assert parser.parse_args(["--entropy_weight", "0.3"]).entropy_weight == 0.3
    with pytest.raises(ValueError, match=r"unknown setting 'entropy_wieght': did you mean 'entropy_weight'\?"):
        schema.check_row_keys(["entropy_wieght"], schema.fields_of(*blocks), "glue.yaml", {"task": "cola"})


def test_settings_object_is_typed_and_records_what_was_given_or_set():
    """A family's Settings: every field an attribute (its default where nothing named it), extras attributes too;
    the record (settings.json, the cell) holds what was given and what the run set since, nothing else."""
    settings = schema.McqRun.of({"task": "arc_e", "K": 3, "source": "BLoB"})
    assert (settings.K, settings.source, settings.learning_rate, settings.mc_samples) == (3, "BLoB", 2e-4, 10)
    assert schema.GlueRun.of({}).eval_steps == 0 and schema.CausalLMRun.of({}).eval_steps == 500  # the family's
    with pytest.raises(AttributeError, match="no setting 'K_'"):
        settings.K_
    settings.K, settings.backbone = 0, "int8"
    assert settings.record() == {"task": "arc_e", "K": 0, "source": "BLoB", "backbone": "int8"}
    assert settings.get("load_in_8bit") is True and settings.get("eval_split", "test") == "test"  # not mcq's
    copied = settings.copy(rank=4)
    assert copied.record()["rank"] == 4 and "rank" not in settings.record() and settings.rank == 16


def test_a_new_field_is_an_attribute_of_the_familys_settings():
    @dataclasses.dataclass
    class Extra(schema.TrainingSettings):
        my_weight: float = schema.setting(0.0, "weight of my term", low=0)

    @dataclasses.dataclass
    class Run(schema.Settings, Extra):
        pass

    assert Run.of({}).my_weight == 0.0 and Run.of({"my_weight": 0.1}).my_weight == 0.1


def test_a_bool_settings_flag_takes_true_false_alone_and_its_no_form(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    schema.add_flags(parser, [schema.GlueSettings], only={"gaussian_embeddings", "quantize_embeddings"})
    given = lambda *argv: vars(parser.parse_args(list(argv)))  # noqa: E731
    assert given() == {"gaussian_embeddings": None, "quantize_embeddings": None}  # not given: the table decides
    assert given("--gaussian_embeddings")["gaussian_embeddings"] is True
    assert given("--gaussian_embeddings", "false")["gaussian_embeddings"] is False
    assert given("--no-gaussian_embeddings")["gaussian_embeddings"] is False
    null = given("--quantize_embeddings", "null")["quantize_embeddings"]  # a null default: null is a value to give
    assert null is schema.NULL and schema.GlueRun.of({"quantize_embeddings": null}).record() == {
        "quantize_embeddings": None}
    with pytest.raises(SystemExit):
        given("--gaussian_embeddings", "null")  # its default is false: true or false only
    assert "expected true/false, got 'null'" in capsys.readouterr().err


def test_a_flag_is_taken_wherever_it_acts():
    """The other side of the refusal of flags without effect: where a flag does act it is taken (nll's candidates
    include tfb's bisection, so the tolerance acts there; mc_batched acts in the width search without an mc mode)."""
    from llmm.run import glue, mcq

    _, settings = glue.resolve([*BASE["glue"], "--noise_width_search", "nll", "--noise_width_tolerance", "0.035"])
    assert settings.noise_width_tolerance == 0.035
    settings = mcq.parse_settings([*BASE["mcq"], "--noise_width_search", "tfb", "--validation_size", "2",
                                   "--eval_modes", "mean", "--mc_batched", "true", "--output_dir", "unused"])
    assert settings.mc_batched is True
