"""Every file in configs/ parses; every table has unique keys and rows that name their source."""

import pytest
import yaml
from conftest import REPO_ROOT

from llmm.run.tables import select_row, table_rows

CONFIG_FILES = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_parses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data
    if "rows" not in data:
        return
    rows = table_rows(data)  # raises on a duplicate key
    assert rows and all(row.get("source") for row in rows), "every row names its source"
    first = rows[0]
    assert select_row(data, **{k: first[k] for k in data["keys"]}) == first
    with pytest.raises(ValueError, match="no row for"):
        select_row(data, **{k: "no-such-value" for k in data["keys"]})


def test_duplicate_rows_are_rejected():
    table = {"keys": ["task"], "rows": [{"task": "a", "source": "x"}, {"task": "a", "source": "y"}]}
    with pytest.raises(ValueError, match="duplicate table row"):
        table_rows(table)


def test_target_table_covers_the_tested_architectures():
    targets = yaml.safe_load((REPO_ROOT / "configs" / "targets.yaml").read_text())
    assert {"llama", "deberta-v2", "bert"} <= set(targets)


def test_unknown_settings_in_a_row_are_rejected():
    table = {"keys": ["task"], "defaults": {"learning_rate": 1e-4}, "columns": ["K"],
             "rows": [{"task": "a", "K": 1, "learnig_rate": 3e-4, "source": "x"}]}
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learnig_rate'\]"):
        table_rows(table)
    table["rows"][0]["learning_rate"] = table["rows"][0].pop("learnig_rate")
    assert table_rows(table)[0]["learning_rate"] == 3e-4


PUBLISHED = {"glue_reference.yaml", "mcq_published.yaml"}  # published figures, not settings


@pytest.mark.parametrize("path", sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if p.name not in PUBLISHED),
                         ids=lambda p: p.name)
def test_every_setting_of_a_table_has_a_declared_range_and_is_in_it(path):
    """Every numeric setting (and LoftQ's SVD method) a table holds is a field of llmm.run.schema with a declared
    range, and the table's own values pass it."""
    from llmm.run.schema import ALL_FIELDS, setting_error

    def settings(node):
        if isinstance(node, dict):
            for name, value in node.items():
                if isinstance(value, (dict, list)):
                    yield from settings(value)
                elif (isinstance(value, (int, float)) and not isinstance(value, bool)) or name == "loftq_svd":
                    yield name, value
        elif isinstance(node, list):
            for item in node:
                yield from settings(item)

    found = list(settings(yaml.safe_load(path.read_text())))
    ranged = {name for name, f in ALL_FIELDS.items() if f.metadata["low"] is not None or f.metadata["choices"]}
    assert [name for name, _ in found if name not in ranged] == []
    assert [(name, value) for name, value in found if setting_error(name, value)] == []
