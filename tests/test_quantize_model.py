"""scripts.quantize_model (bash _init.sh; its work is llmm.run.quantize): LoftQ model directories for a causal LM and
an encoder, and quantize_embeddings, one typed field (true | false | null) for _init.sh and GLUE."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, tiny_deberta, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from test_model import load_4bit
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from llmm import llmm_layers, load_llmm_model
from llmm.run import glue, quantize, schema, tables
from scripts import quantize_model

LLAMA_ARGS = ["--task_type", "causal_lm", "--rank", "8", "--K", "2", "--loftq_iter", "2", "--lora_alpha", "16"]


@pytest.fixture
def llama_dir(tmp_path):
    tiny_llama(initializer_range=0.1).save_pretrained(tmp_path / "tiny-llama")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama"


def test_llama_nf4_directory(llama_dir, tmp_path):
    out = quantize_model.main(["--model", str(llama_dir), "--save_dir", str(tmp_path / "q"), "--bits", "4",
                               "--dtype", "bfloat16", *LLAMA_ARGS])
    assert out.name == "tiny-llama-4bit-8rank"
    assert (out / "tokenizer.json").is_file() and (out / "llmm_init" / "adapter_config.json").is_file()
    saved = load_file(out / "model.safetensors")
    q_proj = saved["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.dtype == torch.bfloat16
    # Reloading the 16-bit backbone through bitsandbytes NF4 reproduces Q exactly.
    quantized = load_4bit(out)
    from bitsandbytes.functional import dequantize_4bit
    for name in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]:
        layer = quantized.get_submodule(f"model.layers.1.{name}")
        dequantized = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        assert torch.equal(dequantized, saved[f"model.layers.1.{name}.weight"]), name
    # The report's numbers match recomputed ones.
    report = json.loads((out / "quantize_report.json").read_text())
    original = load_file(llama_dir / "model.safetensors")
    adapter = load_file(out / "llmm_init" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    weight, q = original[f"{key}.weight"].float(), q_proj.float()
    lora_A, lora_B = (adapter[f"base_model.model.{key}.lora_{f}.weight"] for f in "AB")
    layer = report["layers"][key]
    assert layer["rel_error_q"] == pytest.approx((torch.linalg.norm(weight - q) / torch.linalg.norm(weight)).item(),
                                                 rel=1e-4)
    recomputed = torch.linalg.norm(weight - q - 2.0 * lora_B @ lora_A) / torch.linalg.norm(weight)
    assert layer["rel_error_loftq"] == pytest.approx(recomputed.item(), rel=1e-4)
    assert layer["rel_error_loftq"] < layer["rel_error_q"]
    assert report["settings"]["bits"] == 4 and report["wall_time_s"] > 0


def logits(model, inputs):
    with torch.no_grad():
        return (model(inputs).logits if not hasattr(model, "peft_config") else model(inputs).logits).float()


def test_init_adapter_brings_backbone_closer_to_original(llama_dir, tmp_path):
    out = quantize_model.main(["--model", str(llama_dir), "--save_dir", str(tmp_path / "q"), "--bits", "2",
                               "--dtype", "float32", *LLAMA_ARGS])
    inputs = torch.randint(0, 128, (2, 12))
    original = logits(AutoModelForCausalLM.from_pretrained(llama_dir), inputs)
    backbone = logits(AutoModelForCausalLM.from_pretrained(out), inputs)
    adapted_model = load_llmm_model(AutoModelForCausalLM.from_pretrained(out), str(out / "llmm_init"),
                                    is_trainable=True, k=2)
    assert all(layer.lora_llmm_A["default"].weight.shape[0] == 2 for layer in llmm_layers(adapted_model))
    adapted_model.eval()
    adapted = logits(adapted_model, inputs)
    assert torch.linalg.norm(adapted - original) < 0.9 * torch.linalg.norm(backbone - original)


def test_deberta_uniform_directory(tmp_path):
    original = tiny_deberta(num_labels=2)
    original.save_pretrained(tmp_path / "tiny-deberta")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny-deberta")
    out = quantize_model.main(["--model", str(tmp_path / "tiny-deberta"), "--save_dir", str(tmp_path / "q"),
                               "--task_type", "seq_cls", "--quant", "uniform", "--bits", "2", "--rank", "4",
                               "--K", "1", "--lora_alpha", "4", "--dtype", "float32", "--loftq_iter", "1"])
    model = load_llmm_model(AutoModelForSequenceClassification.from_pretrained(out), str(out / "llmm_init"))
    weight = model.base_model.model.deberta.encoder.layer[0].attention.self.query_proj.get_base_layer().weight
    assert len(torch.unique(weight)) <= 4  # uniform 2-bit: at most 4 levels per tensor
    # The task head stays full precision and has no adapter (pooler.dense matches the target name "dense").
    pooler = model.base_model.model.pooler.dense
    assert type(pooler) is torch.nn.Linear and torch.equal(pooler.weight, original.pooler.dense.weight)
    report = json.loads((out / "quantize_report.json").read_text())
    assert not any("pooler" in name or "classifier" in name for name in report["layers"])


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--bits", "3"], r"bits = 3 is out of range: it must be one of \(2, 4, 8\)"),
    (["--rank", "0"], "rank = 0 is out of range: it must be an integer >= 1"),
    (["--target_modules", "q_proj", "nope_proj"], r"\['nope_proj'\] match no module"),
    (["--preset", "no-such-preset"], "no row for"),
])
def test_bad_inputs_fail_early_and_leave_nothing(llama_dir, tmp_path, args, message):
    base = ["--model", str(llama_dir), "--save_dir", str(tmp_path / "q"), *LLAMA_ARGS]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        quantize_model.main(base + args)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_compensate_scaling_is_the_field_and_reference_scaling_its_old_name(llama_dir, tmp_path, caplog):
    """--compensate_scaling false (the field every table uses) writes the reference's unscaled factors, recorded in
    the report that training runs adopt; --reference_scaling, its old name, does the same with one line."""
    base = ["--model", str(llama_dir), "--bits", "2", "--dtype", "float32", *LLAMA_ARGS]
    runs = {name: quantize_model.main([*base, "--save_dir", str(tmp_path / name), *flags]) for name, flags in [
        ("compensated", []), ("field", ["--compensate_scaling", "false"]), ("old", ["--reference_scaling"])]}
    factors = {name: load_file(out / "llmm_init" / "adapter_model.safetensors") for name, out in runs.items()}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    for factor in (key, key.replace("lora_B", "lora_A")):
        assert torch.equal(factors["field"][factor], factors["old"][factor])
        # compensation divides each factor by sqrt(g), g = alpha / r = 16 / 8: the product by g
        torch.testing.assert_close(factors["compensated"][factor] * 2 ** 0.5, factors["field"][factor])
    assert "--reference_scaling is now --compensate_scaling false" in caplog.text
    made = {name: json.loads((out / "quantize_report.json").read_text())["settings"]["compensate_scaling"]
            for name, out in runs.items()}
    assert made == {"compensated": True, "field": False, "old": False}


def test_existing_output_dir_is_refused_by_the_cli(llama_dir, tmp_path):
    existing = tmp_path / "q" / "tiny-llama-4bit-8rank"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")
    result = subprocess.run([sys.executable, "-m", "scripts.quantize_model", "--model", str(llama_dir),
                             "--save_dir", str(tmp_path / "q"), *LLAMA_ARGS], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: output directory")
    assert (existing / "keep.txt").read_text() == "precious" and len(list(existing.iterdir())) == 1


def test_quantize_embeddings_is_one_typed_field_and_the_tables_hold_its_values():
    found = [f for block in schema.BLOCKS for f in dataclasses.fields(block) if f.name == "quantize_embeddings"]
    assert len(found) == 1 and schema.kind_of(found[0]) is bool and found[0].default is None
    for name, blocks in (("quantize.yaml", schema.BLOCKS), ("glue.yaml", schema.FAMILY_BLOCKS["glue"])):
        table = tables.read_table(tables.CONFIGS / name, blocks)  # every value in its field's range
        values = {row["quantize_embeddings"] for row in tables.table_rows(table)}
        assert values and all(value is None or isinstance(value, bool) for value in values), (name, values)
    assert schema.setting_error("quantize_embeddings", "auto") == "true or false"  # a string is no value of it


def resolve_with(monkeypatch, tmp_path, value, argv):
    """llmm.run.quantize.resolve over configs/quantize.yaml with its quantize_embeddings default set to ``value``."""
    table = tables.read_yaml(quantize.TABLE)
    table["defaults"]["quantize_embeddings"] = value
    (tmp_path / "quantize.yaml").write_text(yaml.safe_dump(table))
    monkeypatch.setattr(quantize, "TABLE", tmp_path / "quantize.yaml")
    return quantize.resolve(["--model", "any/model", "--rank", "4", *argv])


@pytest.mark.parametrize("value, argv, expected, line", [
    (None, ["--task_type", "seq_cls"], True, None),                # null: by architecture, an encoder
    (None, [], False, None),                                       # a causal LM
    (True, ["--quantize_embeddings", "null"], False, None),        # null on the command line wins over a row's true
    (None, ["--quantize_embeddings", "TRUE"], True, None),
    (None, ["--quantize_embeddings", "false", "--task_type", "seq_cls"], False, None),
    ("auto", ["--task_type", "seq_cls"], True,
     "'auto' (configs/quantize.yaml, defaults) is now null (by architecture)"),
    ("auto", [], False, "is now null"),
    ("true", [], True, "'true' (configs/quantize.yaml, defaults) is now true, unquoted"),
    ("False", ["--task_type", "seq_cls"], False, "'False' (configs/quantize.yaml, defaults) is now false"),
    (None, ["--quantize_embeddings", "auto", "--task_type", "seq_cls"], True,
     "--quantize_embeddings auto is now --quantize_embeddings null"),
])
def test_old_quantize_embeddings_values_are_taken_with_one_line(monkeypatch, tmp_path, caplog, value, argv, expected,
                                                                line):
    with caplog.at_level(logging.WARNING, logger="llmm"):
        settings = resolve_with(monkeypatch, tmp_path, value, argv)
    assert settings["quantize_embeddings"] is expected  # resolved: what quantize_report.json records
    lines = [record.getMessage() for record in caplog.records if "quantize_embeddings" in record.getMessage()]
    assert lines == [] if line is None else len(lines) == 1 and line in lines[0], lines


def test_a_bad_quantize_embeddings_value_is_one_error(monkeypatch, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^quantize_embeddings must be true, false or null \(null: by architecture, "
                       r"on for --task_type seq_cls\), got 'maybe': fix configs/quantize.yaml, defaults$"):
        resolve_with(monkeypatch, tmp_path, "maybe", [])
    with pytest.raises(ValueError, match="got 1"):
        resolve_with(monkeypatch, tmp_path, 1, [])
    with pytest.raises(SystemExit) as exit_info:
        resolve_with(monkeypatch, tmp_path, None, ["--quantize_embeddings", "maybe"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert "argument --quantize_embeddings: expected true, false or null, got 'maybe'" in error


def test_glue_reads_null_as_on_and_refuses_the_old_strings(monkeypatch, tmp_path):
    """The same field in the GLUE table: null is by architecture (an encoder: on); a string is one error line."""
    table = tables.read_yaml(glue.TABLE)
    argv = ["--task", "cola", "--quant", "nf", "--rank", "32"]
    for value, expected in ((None, True), (False, False), (True, True)):
        table["defaults"]["quantize_embeddings"] = value
        (tmp_path / "glue.yaml").write_text(yaml.safe_dump(table))
        monkeypatch.setattr(glue, "TABLE", tmp_path / "glue.yaml")
        assert glue.resolve(argv)[1]["quantize_embeddings"] is expected
    table["defaults"]["quantize_embeddings"] = "auto"
    (tmp_path / "glue.yaml").write_text(yaml.safe_dump(table))
    with pytest.raises(ValueError, match=r"glue.yaml: defaults has quantize_embeddings = 'auto': it must be true or "
                       "false"):
        glue.resolve(argv)


def test_its_flags_carry_its_own_fields_help(capsys, monkeypatch):
    """--K, --model and --dtype are named by other families' fields too (test_gsm8k's K, the quick start's model,
    training's compute dtype): quantize_model's --help shows its own (directions written, the model, storage)."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        quantize_model.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = schema.fields_of(schema.QuantizeRun)
    for name in ("K", "model", "dtype"):
        assert f"--{name} {name.upper()} {' '.join(fields[name].metadata['help'].split())}" in text, name
