"""llmm.streaming (the default path of _init.sh, llmm.run.quantize): bit for bit the whole-model path, never the whole
model in memory."""

import json
import logging

import pytest
import torch
from conftest import tiny_deberta, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DebertaV2Model, LlamaModel

from llmm import load_llmm_model, streaming
from llmm.run import quantize
from scripts import quantize_model

LLAMA = ["--task_type", "causal_lm", "--rank", "8", "--K", "2", "--loftq_iter", "2", "--bits", "4",
         "--dtype", "bfloat16"]
DEBERTA = ["--task_type", "seq_cls", "--rank", "4", "--K", "1", "--lora_alpha", "4", "--dtype", "float32",
           "--loftq_iter", "2", "--bits", "2"]


def tensors(folder):
    """Every tensor of a directory's .safetensors files, by name."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def whole_model_run(argv):
    """The path before streaming: the whole model loaded, LoftQ in place, save_pretrained."""
    return quantize.make_init_dir(quantize.resolve(argv), whole_model=True)


def assert_same_directories(streamed, whole):
    for sub in ("", "llmm_init"):
        mine, theirs = tensors(streamed / sub), tensors(whole / sub)
        assert mine.keys() == theirs.keys() and mine
        for name in mine:
            assert mine[name].dtype == theirs[name].dtype, name
            assert torch.equal(mine[name].view(torch.uint8), theirs[name].view(torch.uint8)), name  # bit for bit
    for file in ("config.json", "generation_config.json", "llmm_init/adapter_config.json", "tokenizer_config.json"):
        if (whole / file).exists() or (streamed / file).exists():
            mine, theirs = (json.loads((folder / file).read_text()) for folder in (streamed, whole))
            for config in (mine, theirs):
                if "target_modules" in config:  # a set in PEFT: its order is the hash seed's
                    config["target_modules"] = sorted(config["target_modules"])
                    config["base_model_name_or_path"] = None  # the two directories' own paths
            assert mine == theirs, file
    reports = [json.loads((folder / "quantize_report.json").read_text()) for folder in (streamed, whole)]
    assert list(reports[0]["layers"]) == list(reports[1]["layers"])
    for name, layer in reports[0]["layers"].items():
        other = reports[1]["layers"][name]
        assert (layer["shape"], layer["rel_error_q"], layer["rel_error_loftq"]) == \
               (other["shape"], other["rel_error_q"], other["rel_error_loftq"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_llama_streamed_equals_whole_model(tmp_path, monkeypatch, dtype):
    # A bf16 checkpoint in 3 input shards (index json), written in 4+ output shards.
    tiny_llama(initializer_range=0.1).to(torch.bfloat16).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / streaming.INDEX_FILE).is_file()
    monkeypatch.setattr(streaming, "SHARD_BYTES", 50_000)
    argv = ["--model", str(tmp_path / "m"), *LLAMA, "--dtype", dtype]
    streamed = quantize_model.main([*argv, "--save_dir", str(tmp_path / "streamed")])
    whole = whole_model_run([*argv, "--save_dir", str(tmp_path / "whole")])
    assert len(list(streamed.glob("model-*.safetensors"))) >= 4 and (streamed / streaming.INDEX_FILE).is_file()
    assert_same_directories(streamed, whole)
    # The directory loads as any checkpoint, and the adapter through llmm.
    model = load_llmm_model(AutoModelForCausalLM.from_pretrained(streamed), str(streamed / "llmm_init"))
    assert model(torch.randint(0, 128, (1, 8))).logits.isfinite().all()


@pytest.mark.parametrize("quant", ["uniform", "nf"])
def test_deberta_with_embeddings_streamed_equals_whole_model(tmp_path, quant):
    tiny_deberta(num_labels=2).save_pretrained(tmp_path / "d")
    tiny_tokenizer().save_pretrained(tmp_path / "d")
    argv = ["--model", str(tmp_path / "d"), *DEBERTA, "--quant", quant]
    streamed = quantize_model.main([*argv, "--save_dir", str(tmp_path / "streamed")])
    whole = whole_model_run([*argv, "--save_dir", str(tmp_path / "whole")])
    adapter = tensors(streamed / "llmm_init")
    assert "base_model.model.deberta.encoder.rel_embeddings.lora_embedding_A" in adapter  # embeddings quantized
    assert_same_directories(streamed, whole)
    inputs = torch.randint(0, 128, (2, 9))
    logits = []
    for folder in (streamed, whole):
        model = load_llmm_model(AutoModelForSequenceClassification.from_pretrained(folder), str(folder / "llmm_init"))
        with torch.no_grad():
            logits.append(model.eval()(inputs).logits)
    assert torch.equal(*logits)


def test_prefixless_tied_checkpoint_streams(tmp_path):
    """A base-model checkpoint (no "model." prefix) of a Llama with tied embeddings: the prefix is added and the
    tied lm_head is not written, as from_pretrained + save_pretrained do."""
    model = tiny_llama(initializer_range=0.1)
    model.config.tie_word_embeddings = True
    base = LlamaModel(model.config)
    base.load_state_dict(model.model.state_dict())
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    skeleton = streaming.empty_model(AutoModelForCausalLM, model.config, torch.float32)
    plan, missing = streaming.tensor_plan(tmp_path / "base", skeleton)
    assert missing == [] and all(name == f"model.{key}" for key, name in plan.items())
    argv = ["--model", str(tmp_path / "base"), *LLAMA]
    streamed = quantize_model.main([*argv, "--save_dir", str(tmp_path / "streamed")])
    whole = whole_model_run([*argv, "--save_dir", str(tmp_path / "whole")])
    assert "lm_head.weight" not in tensors(streamed)
    assert_same_directories(streamed, whole)


def test_streaming_never_loads_the_model(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    reads = []
    read = streaming._read
    monkeypatch.setattr(streaming, "_read", lambda place: reads.append(place[:3]) or read(place))
    out = quantize_model.main(["--model", str(tmp_path / "m"), "--save_dir", str(tmp_path / "q"), *LLAMA])
    assert len(set(reads)) == len(reads) == len(tensors(tmp_path / "m"))  # every tensor read once, on its own
    assert (out / "llmm_init" / "adapter_model.safetensors").is_file()


def test_whole_model_asked_for_never_streams(tmp_path, monkeypatch, caplog):
    """make_init_dir(whole_model=True), the comparison path of these tests and of benchmarks/bench_stream_init."""
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("streamed")

    monkeypatch.setattr(streaming, "quantize_checkpoint", refuse)
    monkeypatch.setattr(streaming, "local_checkpoint", refuse)
    with caplog.at_level(logging.INFO, logger="llmm"):
        out = whole_model_run(["--model", str(tmp_path / "m"), "--save_dir", str(tmp_path / "q"), *LLAMA])
    assert any(record.getMessage() == "loading the whole model (asked for)" for record in caplog.records)
    assert (out / "llmm_init" / "adapter_model.safetensors").is_file()


def test_missing_head_falls_back_to_the_whole_model(tmp_path, caplog):
    """A checkpoint without the classifier (transformers initialises it): the whole-model path, said in the log."""
    encoder = DebertaV2Model(tiny_deberta().config)
    encoder.save_pretrained(tmp_path / "encoder")
    tiny_tokenizer().save_pretrained(tmp_path / "encoder")
    with caplog.at_level(logging.INFO, logger="llmm"):
        out = quantize_model.main(["--model", str(tmp_path / "encoder"), "--save_dir", str(tmp_path / "q"),
                                   *DEBERTA, "--quant", "uniform", "--num_labels", "2"])
    assert any("loading the whole model" in record.getMessage() and "classifier" in record.getMessage()
               for record in caplog.records)
    assert "classifier.weight" in tensors(out) and (out / "llmm_init" / "adapter_model.safetensors").is_file()


def test_interrupted_stream_leaves_nothing(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    calls = []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return loftq_factors(*args, **kwargs)

    loftq_factors = streaming.loftq_factors
    monkeypatch.setattr(streaming, "loftq_factors", fail_third)
    with pytest.raises(OSError, match="No space left on device"):
        quantize_model.main(["--model", str(tmp_path / "m"), "--save_dir", str(tmp_path / "q"), *LLAMA])
    assert len(calls) == 3  # the failure came where it was injected, mid-stream
    assert not (tmp_path / "q").exists() or list((tmp_path / "q").iterdir()) == []


def test_writer_round_trip_any_order_and_zeros(tmp_path):
    layout = {"a": (torch.bfloat16, [3, 5]), "z": (torch.float32, [2, 4, 3]), "i": (torch.int64, [7]),
              "b": (torch.float16, [1])}
    values = {"a": torch.randn(3, 5).bfloat16(), "i": torch.arange(7), "b": torch.tensor([1.5]).half()}
    writer = streaming.SafetensorsWriter(tmp_path / "x.safetensors", layout, zeros={"z"})
    for name in reversed(list(values)):
        writer.put(name, values[name])
    with pytest.raises(RuntimeError, match="laid out as"):
        writer.put("a", values["a"].float())
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
               for name, value in values.items())
    assert torch.equal(loaded["z"], torch.zeros(2, 4, 3))
    incomplete = streaming.SafetensorsWriter(tmp_path / "y.safetensors", layout)
    with pytest.raises(RuntimeError, match="never written"):
        incomplete.close()


def test_checkpoint_without_safetensors_loads_the_whole_model(tmp_path, caplog):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    torch.save(load_file(tmp_path / "m" / "model.safetensors"), tmp_path / "m" / "pytorch_model.bin")
    (tmp_path / "m" / "model.safetensors").unlink()
    assert streaming.local_checkpoint(str(tmp_path / "m")) is None
    with caplog.at_level(logging.INFO, logger="llmm"):
        out = quantize_model.main(["--model", str(tmp_path / "m"), "--save_dir", str(tmp_path / "q"), *LLAMA])
    assert any("no safetensors checkpoint" in record.getMessage() for record in caplog.records)
    assert "model.layers.0.mlp.up_proj.weight" in tensors(out)


def test_unreachable_hub_id_is_left_to_the_whole_model_path():
    assert streaming.local_checkpoint("no-such-org/no-such-model") is None  # offline here: from_pretrained reports it
