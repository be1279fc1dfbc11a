"""GSM8K test as a run step (scripts.test_gsm8k): settings, the adapter and its backbone, batched generation in
mean / sample / mc mode, answer extraction and accuracy."""

from __future__ import annotations
import contextlib
import json
import time
from pathlib import Path
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import GenerationConfig, set_seed
from llmm.run import adapters, checkpoints, cli, fileio, schema, tables
from llmm.records import not_a_directory
from llmm.streams import network_seeds
from llmm import LlmmConfig, llmm_layers, load_llmm_model, outdirs, sample_factor, seed_noise, stats
from llmm.tasks.prompts import (accuracy, encode_prompt, extract_answer, gold_answer, gsm8k_source, is_correct,
                          load_records, majority_vote)
from llmm.run.causal_lm import load_backbone, scope_dataset_config


TABLE = tables.CONFIGS / "gsm8k_test.yaml"
BLOCKS = schema.FAMILY_BLOCKS["gsm8k_test"]
OWN_BACKBONE = "the adapter's"  # a test cell's model_name_or_path where it is the backbone the adapter names
SAMPLING = ("temperature", "top_k", "top_p")


def parse_settings(argv=None) -> schema.Gsm8kTestRun:
    table = tables.read_table(TABLE, BLOCKS)
    parser = cli.ArgumentParser(description="Evaluate an Llmm GSM8K adapter: batched generation, answer "
                                     "extraction, exact-match accuracy.", allow_abbrev=False)
    cli.add_output_flags(parser)
    checkpoints.add_skip_flag(parser)
    tables.add_setting_flags(parser, table, BLOCKS, also=("adapter", "mode", "K", "model_name_or_path", "data",
                                                          "max_samples"), row_choices=("decoding",))
    fields = schema.fields_of(*BLOCKS)
    parser.set_defaults(**{name: fields[name].default for name in ("decoding", "mode")})  # recorded in the cell
    args = parser.parse_args(argv)
    settings = schema.Gsm8kTestRun.of({**tables.offered_defaults(BLOCKS, args), **tables.resolve_settings(table, args)})
    scope_dataset_config(settings, args)
    adapters.check_settings(settings)
    fileio.check_data_paths(data=settings.get("data"))
    if settings.do_sample and any(settings[name] is None for name in SAMPLING):
        raise ValueError(f"sampling needs {SAMPLING}: use --decoding reference or give all three")
    adapters.check_flags_apply(settings, adapters.given_flags(args, table["keys"]))
    return settings


def check_adapter(settings: schema.Gsm8kTestRun) -> LlmmConfig:
    """Fail before loading anything: the adapter directory exists, is an Llmm adapter, and has the K asked for."""
    adapter = settings.adapter
    if adapter is None:
        raise ValueError("no adapter: pass --adapter, the adapter/ folder of a train_gsm8k.py run")
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter directory {adapter!r} {not_a_directory(adapter)}: pass the adapter/ "
                                "folder of a train_gsm8k.py run")
    config = LlmmConfig.from_pretrained(adapter)
    if settings.get("K") is not None and settings.K != config.k:
        raise ValueError(f"the adapter in {adapter!r} has K={config.k} but --K {settings.K} was given: drop --K "
                         f"or pass --K {config.k}")
    if settings.get("model_name_or_path") is None:
        if not config.base_model_name_or_path:
            raise ValueError(f"{adapter!r} does not name its backbone: pass --model_name_or_path")
        settings.model_name_or_path = config.base_model_name_or_path
    fileio.check_safetensors(adapter)
    fileio.check_model_path(settings.model_name_or_path)
    return config


def load_test_records(settings: schema.Gsm8kTestRun) -> list[dict]:
    source = settings.get("data") or settings.dataset
    splits = load_records(source, "gsm8k", settings.dataset_config)
    if source.endswith((".json", ".jsonl")):
        records = splits["train"]  # a local file is the evaluation set
    elif settings.split in splits:
        records = list(splits[settings.split])
    else:
        raise ValueError(f"{source} has no {settings.split!r} split (splits: {sorted(splits)}): pass --split")
    records = records[: settings.max_samples] if settings.max_samples else records
    for index, record in enumerate(records):
        if gold_answer(record["answer"]) is None:
            raise ValueError(f"{source}: record {index + 1}'s answer has no '#### <number>' gold answer")
    return records


@contextlib.contextmanager
def sampled_network(model, seed: int):
    """Within: each Llmm factor's mean holds one sample M + m sum_k eps_k / sqrt(s) Z[k] (noise from ``seed``; m the
    adapter's noise width), so a whole generation runs one network; the means are restored after."""
    saved, generator = [], torch.Generator().manual_seed(seed)  # on CPU: the same network on every process
    with torch.no_grad():
        for layer in llmm_layers(model):
            for name, layer_settings in layer.llmm_settings.items():
                if layer_settings["k"] == 0:
                    continue
                for mean, directions in ((layer.lora_A[name].weight, layer.lora_llmm_A[name]),
                                         (layer.lora_B[name].weight, layer.lora_llmm_B[name])):
                    eps = torch.randn(layer_settings["k"], generator=generator).to(mean.device)
                    eps = eps * layer_settings["width"]
                    saved.append((mean, mean.detach().clone()))
                    mean.copy_(sample_factor(mean, directions, eps, layer_settings["scale"]))
    try:
        yield model
    finally:
        with torch.no_grad():
            for mean, value in saved:
                mean.copy_(value)


def load_model(settings: schema.Gsm8kTestRun):
    """(model, tokenizer) ready to generate: the backbone, the adapter in the asked mode, on this process's device."""
    model, tokenizer = load_backbone(settings)
    tokenizer.padding_side = "left"
    eval_noise = "sample" if settings.mode == "sample" else "mean"
    model = load_llmm_model(model, settings.adapter, k=settings.get("K"), eval_noise=eval_noise)
    if not settings.load_in_4bit:
        model = (model.merge_and_unload() if settings.mode == "mean" else model).to(PartialState().device)
    return model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], settings: schema.Gsm8kTestRun) -> list[str]:
    """Greedy or sampled continuations of ``prompts`` (token ids), in batches, left-padded, with the KV cache."""
    sampling = {name: settings[name] for name in SAMPLING} if settings.do_sample else {}
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                              use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id, **sampling)
    device = PartialState().device
    texts = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = tokenizer.pad({"input_ids": prompts[start:start + settings.batch_size]}, padding=True,
                              return_tensors="pt").to(device)
        output = model.generate(**batch, generation_config=config)
        texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts


def predict(model, tokenizer, records: list[dict], settings: schema.Gsm8kTestRun) -> list[dict]:
    """One prediction per record (this process's share), in the asked mode."""
    prompts = [encode_prompt(tokenizer, gsm8k_source(record["question"])) for record in records]
    if settings.mode != "mc":
        set_seed(settings.seed)  # the decoding's sampling (torch's generator)
        if settings.mode == "sample":  # the Llmm noise has its own generator, which set_seed does not touch
            seed_noise(model, settings.seed, PartialState().process_index)
        samples = [[text] for text in generate(model, tokenizer, prompts, settings)]
    else:
        samples = [[] for _ in records]
        # Network d of seed s: child d of SeedSequence(s) (llmm.streams), so no two seeds share a network.
        for network_seed in network_seeds(settings.seed, settings.mc_samples):
            set_seed(network_seed % 2**32)  # the decoding's sampling
            with sampled_network(model, seed=network_seed):
                for sample, text in zip(samples, generate(model, tokenizer, prompts, settings)):
                    sample.append(text)
    predictions = []
    for record, texts in zip(records, samples):
        answers = [extract_answer(text) for text in texts]
        extracted, gold = majority_vote(answers), gold_answer(record["answer"])
        predictions.append({"question": record["question"], "generated": texts[0] if len(texts) == 1 else texts,
                            "extracted": extracted, "gold": gold, "correct": is_correct(extracted, gold),
                            **({"votes": answers} if settings.mode == "mc" else {})})
    return predictions


def main(argv=None) -> dict | None:
    """The test's results, or None when --skip_if_complete found them there already."""
    started = time.time()
    settings = parse_settings(argv)
    output_dir = Path(settings.output_dir)
    adapter_config = check_adapter(settings)  # first: it fills in the backbone the adapter names
    if checkpoints.done_already(output_dir, settings, BLOCKS, settings_in_results=True):
        return None
    adapters.check_sampled_modes([settings.mode], adapter_config.k, "this adapter", "--mode mean")
    outdirs.check_outputs_apart({"--output_dir": output_dir},
                                {f"--{key}": settings.get(key) for key in ("adapter", "model_name_or_path", "data")})
    outdirs.check_output_dir(output_dir, settings.overwrite)
    records = load_test_records(settings)
    model, tokenizer = load_model(settings)
    state = PartialState()
    with state.split_between_processes(list(range(len(records)))) as mine:
        predictions = predict(model, tokenizer, [records[i] for i in mine], settings)
    predictions = [p for _, p in sorted(gather_object(list(zip(mine, predictions))), key=lambda pair: pair[0])]
    results = {
        "accuracy": accuracy([p["extracted"] for p in predictions], [p["gold"] for p in predictions]),
        "n": len(predictions), "n_correct": sum(p["correct"] for p in predictions),
        "n_without_number": sum(p["extracted"] is None for p in predictions),
        "mode": settings.mode, "decoding": settings.decoding, "adapter": settings.adapter,
        "noise_width": float(getattr(adapter_config, "noise_width", 1.0)),  # m of the sample / mc modes' noise
        "model": settings.model_name_or_path, "wall_time_s": time.time() - started,
        "settings": fileio.real_inputs(settings.record(), BLOCKS), "versions": fileio.versions(),  # paths resolved
    }
    tested = settings.copy()
    if checkpoints.same_setting(settings.model_name_or_path, adapter_config.base_model_name_or_path):
        tested.model_name_or_path = OWN_BACKBONE  # one value for every run (its cell names it): seeds pool
    results["seed"], results["cell"] = stats.test_cell(Path(settings.adapter).parent, tested)  # for tables
    outdirs.make_output_dir(output_dir, settings.overwrite)
    if state.is_main_process:
        fileio.write_text(output_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        fileio.write_json(output_dir / "results.json", results)
        cli.logger.info("GSM8K accuracy %.2f%% (%d / %d) -> %s", 100 * results["accuracy"], results["n_correct"],
                      results["n"], output_dir)
    return results
