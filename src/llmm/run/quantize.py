"""The _init.sh job (scripts.quantize_model): LoftQ-quantize a model into a backbone + Llmm init adapter directory.

    settings = resolve(["--preset", "llama-2-7b-gsm8k"])   # configs/quantize.yaml's row, then the flags
    folder = make_init_dir(settings)                        # SAVE_DIR/<model-name>-<bits>bit-<rank>rank/

Targets: the linears of configs/targets.yaml (or --target_modules) outside the task head, plus, with
quantize_embeddings, the embedding tables of configs/embedding_targets.yaml. LoftQ runs matrix by matrix, streamed
from the checkpoint's safetensors (llmm.streaming) unless the checkpoint has none or lacks tensors transformers would
initialise (a new classifier head): then the whole model is loaded (``quantize``, ``save``), and the log says why.
``make_init_dir(settings, whole_model=True)`` takes the whole-model path on purpose (tests, benchmarks)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

from llmm import get_llmm_model, outdirs, streaming
from llmm.embedding import LlmmEmbedding, embedding_targets
from llmm.outdirs import atomic_dir, check_new_dir
from llmm.run import adapters, cli, fileio, quiet, schema, tables

TABLE = tables.CONFIGS / "quantize.yaml"
LOADERS = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}
OLD_EMBEDDINGS = {"auto": None, "true": True, "false": False}  # configs/quantize.yaml's strings before the field


def embeddings_setting(value, where: str) -> bool | None:
    """quantize_embeddings as the schema types it: true, false or null (by architecture). The old strings "auto",
    "true", "false" are taken with one line naming the new form; anything else is one error naming ``where``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in OLD_EMBEDDINGS:
        new = OLD_EMBEDDINGS[value.strip().lower()]
        cli.logger.warning("quantize_embeddings %r (%s) is now %s%s: please write that", value, where,
                           json.dumps(new), " (by architecture)" if new is None else ", unquoted")
        return new
    raise ValueError(f"quantize_embeddings must be true, false or null (null: by architecture, on for --task_type "
                     f"seq_cls), got {value!r}: fix {where}")


def embeddings_quantized(value: bool | None, task_type: str) -> bool:
    """Whether the embedding tables are quantized: ``value``, or for null by architecture (an encoder, task_type
    seq_cls: on, the GLUE protocol; a causal LM: off)."""
    return task_type == "seq_cls" if value is None else bool(value)


# Every block (quantize_embeddings is GlueSettings'), then quantize_model's own: a later block's field wins.
QUANTIZE_BLOCKS = (*schema.BLOCKS, schema.AdapterSettings, schema.LoftQSettings, schema.QuantizeSettings)


def resolve(argv: list[str] | None = None) -> schema.QuantizeRun:
    """The settings: configs/quantize.yaml's defaults or --preset row, then the flags given; bad values fail here,
    before anything is loaded or written."""
    table = tables.read_keyed(TABLE)
    parser = cli.ArgumentParser(description="LoftQ-quantize a model's target linear layers and save a backbone "
                                     "+ Llmm init adapter directory.")
    parser.add_argument("--reference_scaling", action="store_true", help="old name of --compensate_scaling false")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    tables.add_setting_flags(parser, table, blocks=QUANTIZE_BLOCKS,  # its own fields' help wins (K, model, dtype)
                             plumbing_blocks=(schema.QuantizeSettings,))  # no run flags it ignores
    schema.add_flags(parser, (schema.AdapterSettings, schema.QuantizeSettings),
                     only={"target_modules", *schema.fields_of(schema.QuantizeSettings)})
    args = parser.parse_args(argv)
    row = tables.select_row(table, preset=args.preset) if args.preset else dict(table["defaults"])
    settings = schema.QuantizeRun.of(row)
    where = f"configs/quantize.yaml, {'row ' + args.preset if args.preset else 'defaults'}"
    settings.quantize_embeddings = embeddings_setting(settings.get("quantize_embeddings"), where)
    if vars(args).pop("reference_scaling"):
        if args.compensate_scaling is not None:
            raise ValueError("--reference_scaling is the old name of --compensate_scaling false: pass only "
                             "--compensate_scaling")
        cli.logger.warning("--reference_scaling is now --compensate_scaling false: please write that")
        settings.compensate_scaling = False
    settings.update({k: v for k, v in vars(args).items() if v is not None})
    if settings.quantize_embeddings is schema.NULL:  # null on the command line: by architecture, over the row's
        settings.quantize_embeddings = None
    for name in ("model", "rank"):
        if settings.record().get(name) is None:  # given by the row or a flag
            raise ValueError(f"--{name} is required without --preset (presets: configs/quantize.yaml)")
    adapters.check_settings(settings)  # every value in its field's range (llmm.run.schema)
    adapters.check_flags_apply(settings, adapters.given_flags(args, ("preset",)))
    settings.quantize_embeddings = embeddings_quantized(settings.quantize_embeddings, settings.task_type)
    if settings.device == "cuda":
        cli.require_cuda_for("--device cuda")
    if settings.num_labels is not None and settings.task_type != "seq_cls":
        raise ValueError("--num_labels sizes the classifier of --task_type seq_cls; a causal LM has none: drop it")
    return settings


def check_task_type(model_config, settings) -> None:
    """transformers has a head of --task_type for this architecture (an encoder is no causal LM)."""
    heads = {"causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "seq_cls": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}
    if model_config.model_type not in heads[settings.task_type]:
        other = [task for task, names in heads.items() if model_config.model_type in names]
        raise ValueError(f"{settings.model!r} is a {model_config.model_type} model, which transformers has no "
                         f"--task_type {settings.task_type} head for: "
                         + (f"pass --task_type {other[0]}" if other else "quantize a supported architecture"))


def head_linears(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Target-named linears inside the task head (e.g. DeBERTa's pooler.dense): left in full precision."""
    heads = adapters.head_modules(model)
    return [name for name, _ in model.named_modules()
            if name.split(".")[-1] in targets and adapters.inside(name, heads)]


def target_linears(model: torch.nn.Module, targets: list[str], rank: int) -> dict[str, torch.nn.Linear]:
    """Target name -> nn.Linear, checked before any work: every target matches, is linear and wider than r.
    The task head (classifier, pooler) is never quantized."""
    skip = set(head_linears(model, targets))
    found = {name: module for name, module in model.named_modules()
             if name.split(".")[-1] in targets and name not in skip}
    unmatched = sorted(set(targets) - {name.split(".")[-1] for name in found})
    in_head = sorted(set(unmatched) & {name.split(".")[-1] for name in skip})
    if in_head:
        heads = ", ".join(adapters.head_modules(model))
        raise ValueError(f"target module(s) {in_head} lie only in the task head ({heads}), which an _init.sh "
                         "directory keeps in full precision, neither quantized nor adapted: drop them from "
                         "--target_modules")
    if unmatched:
        raise ValueError(f"target module(s) {unmatched} match no module of this model: check --target_modules")
    for name, module in found.items():
        if type(module) is not torch.nn.Linear:
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not a torch.nn.Linear: drop it from "
                             "--target_modules")
    widths = {name: min(module.weight.shape) for name, module in found.items()}
    narrowest = min(widths, key=widths.get, default=None)
    if narrowest is not None and rank > widths[narrowest]:
        raise ValueError(f"rank {rank} exceeds min(shape) = {widths[narrowest]} of {narrowest!r}: pass --rank "
                         f"{widths[narrowest]} or less, or drop that module from --target_modules")
    return found


def plan(model: torch.nn.Module, settings: schema.QuantizeRun, targets: list[str]) -> tuple:
    """The Llmm config (LoftQ settings, targets) and the modules to quantize: the target linears, plus the
    embedding tables with quantize_embeddings. ``model`` may be on the meta device (llmm.streaming)."""
    modules = target_linears(model, targets, settings.rank)
    if settings.quantize_embeddings:
        modules.update(embedding_targets(model, tables.default_embedding_targets(model.config)))
        targets = targets + sorted({name.split(".")[-1] for name in modules} - set(targets))
    config = adapters.llmm_config(settings.copy(init="loftq"), targets, loftq_block_size=settings.block_size,
                                  exclude_modules=head_linears(model, targets) or None)
    return config, modules


def quantize(settings: schema.QuantizeRun, config, modules: dict) -> tuple[dict, dict]:
    """The whole-model path over ``plan``'s config and modules: replace each target weight by Q in place; return the
    means and the per-layer report."""
    means, report = {}, {}
    for name, module in quiet.progress(modules.items(), desc="LoftQ", unit="layer"):
        weight = module.weight.detach().to(settings.device)
        q, factor_A, factor_B, report[name] = streaming.loftq_matrix(weight, config, getattr(torch, settings.dtype))
        module.weight.data = q.to(module.weight.device)
        means[name] = (factor_A, factor_B)
    return means, report


def save(model, tokenizer, config, means: dict, settings: schema.QuantizeRun, tmp_dir: Path, final_dir: Path) -> None:
    """The whole-model path's directory: the backbone (in ``dtype``), tokenizer and llmm_init/ with the means."""
    init_config = dataclasses.replace(config, init_lora_weights=False, loftq_config={})
    peft_model = get_llmm_model(model, init_config)
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in means and isinstance(module, LlmmEmbedding):  # PEFT's layout: A = M_B^T, B = M_A^T
                module.lora_embedding_A["default"].copy_(means[name][1].T)
                module.lora_embedding_B["default"].copy_(means[name][0].T)
            elif name in means:
                module.lora_A["default"].weight.copy_(means[name][0])
                module.lora_B["default"].weight.copy_(means[name][1])
    # Record the LoftQ settings that produced the means, and the backbone they belong to.
    peft_model.peft_config["default"] = dataclasses.replace(config, base_model_name_or_path=str(final_dir))
    peft_model.save_pretrained(tmp_dir / "llmm_init")
    peft_model.unload().to(getattr(torch, settings.dtype)).save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)


def make_init_dir(settings: schema.QuantizeRun, whole_model: bool = False) -> Path:
    """Write the directory of resolved ``settings`` (``resolve``); return its path. Streamed from the checkpoint's
    safetensors where that applies, else (or with ``whole_model``) with the whole model loaded: the same directory
    bit for bit. Locked, written under a temporary name and renamed on success (llmm.outdirs)."""
    started = time.time()
    name = Path(settings.model.rstrip("/")).name
    final_dir = Path(settings.save_dir) / f"{name}-{settings.bits}bit-{settings.rank}rank"
    outdirs.check_outputs_apart({"--save_dir": final_dir}, {"--model": settings.model})
    if final_dir.exists() and any(final_dir.iterdir()) and not settings.get("overwrite"):
        raise FileExistsError(f"output directory {str(final_dir)!r} exists and is not empty: pass --overwrite "
                              "or another --save_dir")
    check_new_dir(final_dir, settings.get("overwrite", False))  # a file, locked, or not llmm's to replace
    extra = {"num_labels": settings.num_labels} if settings.num_labels else {}
    model_config = fileio.load_pretrained(AutoConfig, settings.model, **extra)
    check_task_type(model_config, settings)
    tokenizer = fileio.load_pretrained(AutoTokenizer, settings.model)  # before hours of LoftQ: needed
    targets = tables.default_targets(model_config, settings.target_modules)
    # The model is built on the meta device only to decide the targets and the layout (llmm.streaming).
    folder = None if whole_model else streaming.local_checkpoint(settings.model)
    model, why = None, "asked for" if whole_model else "no safetensors checkpoint"
    if folder is not None:
        model = streaming.empty_model(LOADERS[settings.task_type], model_config,
                                      streaming.checkpoint_dtype(folder, model_config))
        missing = streaming.tensor_plan(folder, model)[1]
        model, why = (None, f"the checkpoint lacks {missing[:3]}") if missing else (model, "")
    if model is None:
        cli.logger.info("loading the whole model (%s)", why)
        # The checkpoint's own dtype, so LoftQ sees the original weights; the backbone is saved in settings.dtype.
        model = fileio.load_pretrained(LOADERS[settings.task_type], settings.model, dtype="auto", **extra)
    config, modules = plan(model, settings, targets)  # bad targets, rank or tables fail before anything is written
    with atomic_dir(final_dir, overwrite=settings.get("overwrite", False)) as tmp_dir:
        if model.device.type == "meta":
            report = streaming.quantize_checkpoint(
                folder, tmp_dir, model, modules, config, getattr(torch, settings.dtype), settings.device,
                final_dir=final_dir,
                progress=lambda items: quiet.progress(items, desc="LoftQ (streamed)", unit="tensor"))
            tokenizer.save_pretrained(tmp_dir)
        else:
            means, report = quantize(settings, config, modules)
            save(model, tokenizer, config, means, settings, Path(tmp_dir), final_dir)
        mean_q, mean_loftq = (sum(layer[key] for layer in report.values()) / len(report)
                              for key in ("rel_error_q", "rel_error_loftq"))
        fileio.write_json(Path(tmp_dir) / "quantize_report.json", {
            "settings": settings.record(), "versions": fileio.versions(), "wall_time_s": time.time() - started,
            "mean_rel_error_q": mean_q, "mean_rel_error_loftq": mean_loftq, "layers": report})
    cli.logger.info("wrote %s (mean relative error: Q %.4f, Q + gBA %.4f)", final_dir, mean_q, mean_loftq)
    return final_dir
