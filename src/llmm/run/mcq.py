"""Multiple-choice calibration (BLoB's protocol) as a run recipe (scripts.train_mcq, scripts.test_mcq).

Training: the causal-LM recipe (llmm.run.causal_lm) with the loss of the answer letter among the question's
letters. After training the test split and the row's OOD sets are evaluated in every eval mode: accuracy, ECE,
NLL and Brier; the width of the learned Gaussian (llmm.width) is recorded every logging_steps. The method's
options are ``variants`` of configs/mcq.yaml; the width search runs on the validation split, the last
``validation_size`` training questions (the same for every seed and method of a row).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from llmm.run import adapters, causal_lm, checkpoints, cli, fileio, schema, tables, width_search
from llmm.run.width_search import noise_width_in_use
from llmm import metrics, stats
from llmm.model import keep_cpu_4bit_trainable, seed_noise
from llmm.tasks import calibration as C
from llmm.tasks.mcq import encode_question, letter_token_ids, load_mcq, question_ids
from llmm.width import distribution_width, width_summary
from llmm.run import trainer as training

TABLE = tables.CONFIGS / "mcq.yaml"
BLOCKS = schema.FAMILY_BLOCKS["mcq"]
# Evaluation plumbing, replaced in each evaluation's cell by the set, mode and number of samples it used.
EVALUATION_ONLY = (*schema.role_names(schema.EVAL, BLOCKS), "run", "cell")


# --- settings ------------------------------------------------------------------------------------------------------

def check_settings(settings: schema.McqRun, table: dict, args) -> schema.McqRun:
    adapters.check_settings(settings, BLOCKS)
    method = settings.method
    if isinstance(settings.eval_modes, dict):  # the table's modes per method
        settings.eval_modes = settings.eval_modes[method]
    adapters.set_method_k(settings, args.K, "map")
    if method == "mcdropout":
        if args.lora_dropout is not None:
            raise ValueError("--method mcdropout takes its dropout from mc_dropout; drop --lora_dropout")
        settings.lora_dropout = settings.mc_dropout
    if "dropout" in settings.eval_modes and not settings.lora_dropout > 0:
        raise ValueError("eval mode 'dropout' needs dropout in the adapters: use --method mcdropout")
    unknown = [m for m in settings.eval_modes if m not in C.MODES]
    if unknown:
        raise ValueError(f"unknown eval mode(s) {unknown} in the table; known: {C.MODES}")
    adapters.check_sampled_modes(settings.eval_modes, settings.K, f"--method {method}", "mean (or dropout for "
                                 "mcdropout)")
    if settings.load_in_8bit and settings.load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit are both true: choose one backbone precision")
    init_dir = causal_lm.init_adapter_dir(settings.model_name_or_path)
    if init_dir is not None:
        causal_lm.adopt_init_dir(init_dir, settings, args)
        if settings.load_in_8bit:
            raise ValueError("an _init.sh directory holds LoftQ's NF values Q, which 8-bit loading would re-quantize: "
                             "pass --load_in_8bit false (and --load_in_4bit true for bitsandbytes NF4)")
        settings.init = "loftq"
    elif settings.init == "loftq" and (settings.load_in_8bit or settings.load_in_4bit):
        raise ValueError("in-process LoftQ needs the full-precision weights: pass --load_in_8bit false "
                         "--load_in_4bit false (LoftQ then fake-quantizes them at --bits), or an _init.sh directory")
    if settings.noise_width_search != "none" and not settings.K > 0:
        raise ValueError(f"noise_width_search {settings.noise_width_search} scales the Llmm noise, which --method "
                         f"{method} (K = 0) does not have: use --method llmm with K > 0, or --noise_width_search none")
    if settings.noise_width_search != "none" and not settings.validation_size > 0:
        raise ValueError(f"noise_width_search {settings.noise_width_search} needs a validation split: set "
                         "--validation_size N (questions held out of the end of the training data)")
    if settings.entropy_weight > 0 and not settings.K > 0:
        raise ValueError(f"the entropy term acts on the directions Z, which --method {method} (K = 0) does not "
                         "have: use --method llmm with K > 0, or --entropy_weight 0")
    if not settings.train_data and not settings.train_split:
        raise ValueError(f"task {settings.task!r} is an evaluation-only set (no train split): train on another "
                         "task and list it under --ood, or pass --train_data FILE")
    rows = {row["task"]: row for row in tables.table_rows(table)}
    for name in settings.ood:
        if name not in rows and not name.endswith((".json", ".jsonl")):
            raise ValueError(f"OOD set {name!r} is neither a task row ({sorted(rows)}) nor a .json/.jsonl file")
    adapters.check_settings(settings, BLOCKS)
    fileio.check_data_paths(train_data=settings.train_data, test_data=settings.test_data,
                       ood=[n for n in settings.ood if n.endswith((".json", ".jsonl"))])
    fileio.check_model_path(settings.model_name_or_path)
    settings.backbone = backbone_name(settings)
    adapters.check_flags_apply(settings, adapters.given_flags(args, ("task",)))
    return settings


def variant_settings(table: dict, name: str | None) -> dict:
    """The settings of one entry of the table's ``variants`` block (a method of the calibration table)."""
    if name is None:
        return {}
    variants = table.get("variants") or {}
    if name not in variants:
        raise ValueError(f"unknown variant {name!r}: configs/mcq.yaml's variants are {sorted(variants)}")
    for key, value in variants[name].items():
        schema.check_row_keys([key], schema.fields_of(*BLOCKS), TABLE.name, f"variants.{name}")
        rule = schema.setting_error(key, value, BLOCKS)
        if rule:
            raise ValueError(f"{TABLE.name}: variants.{name} has {key} = {value!r}: it must be {rule}")
    return dict(variants[name])


def resolve_settings(table: dict, args) -> dict:
    """Defaults, the task row, the variant's settings, then the flags that were given."""
    settings = tables.select_row(table, task=args.task)
    variant = args.variant if args.variant is not None else settings.get("variant")
    own = variant_settings(table, variant)
    given = {k: v for k, v in vars(args).items() if v is not None}
    clash = sorted(k for k in own if k in given and given[k] != own[k])
    if clash:  # the row would be labelled by a variant it is not
        raise ValueError(f"--{clash[0]} {given[clash[0]]!r} contradicts --variant {variant}, which sets {clash[0]} = "
                         f"{own[clash[0]]!r}: drop --{clash[0]}, or name another variant")
    adapters.check_eval_modes(given.get("eval_modes"))
    settings.update(own)
    settings.update(given)
    return settings


def parse_settings(argv=None) -> schema.McqRun:
    table = tables.read_table(TABLE, BLOCKS)
    parser = cli.ArgumentParser(description="Fine-tune a causal LM on a multiple-choice task (BLoB's calibration "
                                     "protocol), then measure its calibration.", allow_abbrev=False)
    cli.add_output_flags(parser)
    checkpoints.add_resume_flag(parser)
    tables.add_setting_flags(parser, table, BLOCKS, also=("method", "init", "target_modules", "eval_modes", "ood",
                                                          "max_train_samples", "max_eval_samples", "data_seed"),
                             required=("task",), row_choices=("task",))
    args = parser.parse_args(argv)
    schema.take_renamed(args, BLOCKS)
    return check_settings(schema.McqRun.of({**tables.offered_defaults(BLOCKS, args), **resolve_settings(table, args)}),
                          table, args)


def backbone_name(settings: schema.McqRun) -> str:
    """What the adapters sit on: int8 (LLM.int8), nf4 (bitsandbytes), nf4/nf2 LoftQ, or the 16/32-bit weights."""
    if settings.load_in_8bit:
        return "int8"
    if settings.init == "loftq":
        return f"loftq-{settings.quant}{settings.bits}"
    if settings.load_in_4bit:
        return "nf4"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[settings.dtype]


# --- data ----------------------------------------------------------------------------------------------------------

def task_records(settings: schema.McqRun, table: dict, task: str, split: str) -> tuple[list[dict], str]:
    """(records with ids, where from) of a task row's split ("train" / "test"), or of a local file (its real path)."""
    if task.endswith((".json", ".jsonl")):
        row, local = {}, task
    else:
        row = settings if task == settings.task else tables.select_row(table, task=task)
        local = row.get(f"{split}_data")
    if local:
        source, where = (local,), fileio.real_path(local)
    elif row[f"{split}_split"]:
        source = (row["dataset"], row.get("dataset_config"), row[f"{split}_split"])
        where = f"{row['dataset']} [{source[2]}]"
    else:
        raise ValueError(f"task {task!r} has no {split} split")
    return [{**record, "id": ident} for record, ident in zip(load_mcq(*source), question_ids(*source))], where


def load_all(settings: schema.McqRun, table: dict, train: bool = True, with_validation: bool = False) -> tuple:
    """Training records (none with ``train=False``), {eval set: (records, where)} with the task's test split
    first, and with ``with_validation`` the validation records (the last ``validation_size`` training records)."""
    train = task_records(settings, table, settings.task, "train")[0] if train else []
    size = (settings.validation_size or 0) if train else 0
    if size and size >= len(train):
        raise ValueError(f"validation_size {size} leaves no training data ({len(train)} records): lower "
                         "--validation_size")
    train, validation = (train[:-size], train[-size:]) if size else (train, [])
    sets = {settings.task: task_records(settings, table, settings.task, "test")}
    for name in settings.ood:
        sets[Path(name).stem if name.endswith((".json", ".jsonl")) else name] = task_records(settings, table, name,
                                                                                           "test")
    limit = settings.max_eval_samples
    sets = {name: (records[:limit] if limit else records, where) for name, (records, where) in sets.items()}
    if settings.max_train_samples:
        train = train[:settings.max_train_samples]
    return (train, sets, validation) if with_validation else (train, sets)


# --- model ---------------------------------------------------------------------------------------------------------

class LetterTrainer(training.LlmmTrainer):
    """The Llmm Trainer with the answer-letter loss (llmm.tasks.calibration.letter_loss)."""

    def __init__(self, *args, letter_ids: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.letter_ids = torch.tensor(letter_ids)
        # The letter loss is a mean over this micro-batch's questions: the Trainer must average it over the
        # accumulation steps (it would sum them if it took the loss as normalised by num_items_in_batch).
        self.model_accepts_loss_kwargs = False

    def task_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = C.letter_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["n_choices"],
                                 self.letter_ids)
        loss = torch.nn.functional.cross_entropy(logits, inputs["labels"].to(logits.device))
        return (loss, {"logits": logits}) if return_outputs else loss


class WidthCallback(TrainerCallback):
    """Records the learned distribution's width (llmm.width) at the start and at every logging step, as "width"
    entries of the Trainer's log history: a checkpoint keeps them, so a resumed run's history is whole."""

    def on_log(self, args, state, control, model=None, **kwargs):
        self.record(state, model)

    on_train_begin = on_log  # a resume replaces its entry with the checkpoint's history just after

    @staticmethod
    def record(state, model) -> None:
        if not any("width" in entry for entry in state.log_history if entry.get("step") == state.global_step):
            state.log_history.append({"step": state.global_step, "width": width_summary(distribution_width(model))})


# --- evaluation ----------------------------------------------------------------------------------------------------

def run_cell(settings: schema.McqRun) -> dict:
    """The run's cell (llmm.stats.cell_of) without the evaluation plumbing each evaluation's cell states."""
    return {key: value for key, value in stats.cell_of(settings).items() if key not in EVALUATION_ONLY}


def evaluation_cell(cell: dict, entry: dict) -> dict:
    """The cell of one evaluation (what tables pool seeds by): the run's, plus the set, mode and N."""
    return {**cell, "eval_set": entry["eval_set"], "eval_where": entry["where"], "eval_mode": entry["mode"],
            "eval_samples": entry["eval_samples"]}


def eval_precision(settings: schema.McqRun) -> str:
    """How every multiple-choice evaluation computes (train_mcq, test_mcq and plain PEFT alike), for results.json."""
    return (f"backbone {settings.backbone} computing in {settings.dtype}; adapter factors and their noise in "
            f"float32, the update added in {settings.dtype}; letter softmax in float32; no autocast; bitsandbytes "
            "CPU 4-bit as in a freshly loaded model")


def evaluation_entry(eval_sets: dict, name: str, mode: str, n_networks: int, probs, labels, cell: dict,
                     **run) -> dict:
    """One (set, mode) entry of results.json, logged: the metrics of ``probs``, ``run``'s facts, the evaluation's
    cell and every question's probabilities."""
    report, (records, where) = C.evaluate(probs, labels), eval_sets[name]
    entry = {"eval_set": name, "shift": "in-distribution" if name == next(iter(eval_sets)) else "ood",
             "where": where, "mode": mode, "eval_samples": n_networks, **run, **report}
    entry["cell"] = evaluation_cell(cell, entry)
    entry["questions"] = C.question_records(probs, labels, [len(r["choices"]) for r in records],
                                            [r.get("id", str(i + 1)) for i, r in enumerate(records)])
    count = f"M={n_networks}" if mode == "ensemble" else f"N={n_networks}"
    cli.logger.info("%s %s (%s): accuracy %.4f, ECE %.4f, NLL %.4f, Brier %.4f", name, mode, count,
                    report["accuracy"], report["ece"], report["nll"], report["brier"])
    return entry


def evaluate_sets(peft_model, tokenizer, letter_ids, eval_sets: dict, settings: schema.McqRun,
                  output_dir: Path | None, method: str, cell: dict) -> list[dict]:
    """Every eval set in every mode: one entry per (set, mode) with its metrics, cell and every question's
    probabilities; a reliability PNG per set when ``output_dir`` is given."""
    device = next(peft_model.parameters()).device
    head = C.LetterHead(peft_model, letter_ids).to(device)
    entries = []
    for name, (records, _) in eval_sets.items():
        encoded = [encode_question(tokenizer, r, settings.max_length) for r in records]
        batches = C.batches(encoded, settings.per_device_eval_batch_size, tokenizer.pad_token_id, device)
        reports = {}
        for mode in settings.eval_modes:
            n_networks = settings.mc_samples if mode in C.SAMPLED_MODES else 1
            torch.manual_seed(settings.seed)  # the same draws for every set and rerun: dropout masks,
            seed_noise(peft_model, settings.seed)  # and the Llmm noise (the model's own generator)
            started = time.time()
            batched = mode == "mc" and settings.mc_batched  # speed only: network n is stream n of the seed either way
            with training.outside_training_autocast(peft_model):
                probs, labels = C.predict(head, batches, mode, n_networks,
                                          seed=settings.seed if mode == "mc" else None, batched=batched)
            entries.append(evaluation_entry(
                eval_sets, name, mode, n_networks, probs, labels, cell, method=method, seed=settings.seed,
                noise_width=noise_width_in_use(peft_model), mc_batched=batched, K=settings.K,
                backbone=settings.backbone, wall_time_s=time.time() - started))
            reports[f"{name} {mode}" + (f" N={n_networks}" if mode in C.SAMPLED_MODES else "")] = entries[-1]
        if output_dir is not None:
            C.plot_reliability(output_dir / f"reliability-{name}.png", reports)
    return entries


def validation_nll(model, tokenizer, letter_ids, records: list[dict], settings: schema.McqRun):
    """nll(m) of the width search: the validation NLL of the mc prediction (networks from the seed's own streams)."""
    device = next(model.parameters()).device
    head = C.LetterHead(model, letter_ids).to(device)
    batches = C.batches([encode_question(tokenizer, r, settings.max_length) for r in records],
                        settings.per_device_eval_batch_size, tokenizer.pad_token_id, device)

    def nll(m: float) -> float:  # as the evaluations compute: without the Trainer's mixed-precision autocast
        with training.outside_training_autocast(model):
            probs, labels = C.predict(head, batches, "mc", settings.mc_samples, seed=settings.seed,
                                      batched=settings.mc_batched)
        return metrics.nll(probs, labels) if np.isfinite(probs).all() else math.inf

    return nll


def search_noise_width(model, tokenizer, letter_ids, validation: list[dict], settings: schema.McqRun) -> dict | None:
    """The width search of ``settings`` (none: None) on the ``validation`` questions: m applied, the record returned."""
    if settings.noise_width_search == "none":
        return None
    nll = validation_nll(model, tokenizer, letter_ids, validation, settings)
    found = width_search.search_width(model, nll, settings, f"on {len(validation)} validation questions")
    return {**found, "n_validation": len(validation), "mc_samples": settings.mc_samples, "seed": settings.seed,
            "mc_batched": settings.mc_batched}


class McqRecipe(causal_lm.CausalLMRecipe):
    """The causal-LM recipe with the answer-letter loss, the width history and the calibration evaluations."""

    blocks = BLOCKS
    not_sharded = "the multiple-choice evaluations run on the main process alone (a sharded model needs every process)"

    def __init__(self, settings: schema.McqRun, table: dict):
        super().__init__(settings, settings.task, encode=None)
        self.table = table

    def load_data(self):
        self.train_records, self.eval_sets, self.validation = load_all(self.settings, self.table, with_validation=True)

    def load_model(self, arguments):
        model, tokenizer = causal_lm.load_backbone(self.settings)  # load_in_8bit: LLM.int8, BLoB's backbone
        model.config.use_cache = False
        keep_cpu_4bit_trainable(model)
        peft_model = causal_lm.attach_adapter(model, self.settings)
        peft_model.print_trainable_parameters()
        n_letters = max(len(r["choices"]) for records in [self.train_records, *(r for r, _ in self.eval_sets.values())]
                        for r in records)
        self.letter_ids = letter_token_ids(tokenizer, n_letters)
        return peft_model, tokenizer

    def datasets(self, tokenizer):
        encode = functools.partial(encode_question, tokenizer, max_length=self.settings.max_length)
        return (datasets.Dataset.from_list([encode(r) for r in self.train_records]),
                datasets.Dataset.from_list([encode(r) for r in self.eval_sets[self.settings.task][0]]))

    def make_trainer(self, model, tokenizer, arguments, train_set, held_out):
        return LetterTrainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=held_out,
                             data_collator=functools.partial(C.collate, pad_token_id=tokenizer.pad_token_id),
                             processing_class=tokenizer, callbacks=[WidthCallback()], letter_ids=self.letter_ids)

    def after_training(self, trainer, model, tokenizer) -> None:
        self.width_search = search_noise_width(model, tokenizer, self.letter_ids, self.validation, self.settings)

    def finish(self, trainer, outcome, model, tokenizer) -> dict:
        settings = self.settings
        WidthCallback.record(trainer.state, model)
        if not trainer.is_world_process_zero():
            return {}
        cell = run_cell(settings)
        evaluations = evaluate_sets(model, tokenizer, self.letter_ids, self.eval_sets, settings, self.output_dir,
                                    settings.method, cell)
        return {
            "task": settings.task, "method": settings.method, "seed": settings.seed, "cell": cell, "K": settings.K,
            "llmmscale": settings.llmmscale, "rank": settings.rank, "backbone": settings.backbone,
            "bits": settings.bits if settings.init == "loftq" else None, "init": settings.init,
            "model": settings.model_name_or_path, "eval_modes": settings.eval_modes, "mc_samples": settings.mc_samples,
            "eval_precision": eval_precision(settings), "n_train": len(trainer.train_dataset),
            "train_loss": outcome.training_loss, "global_step": trainer.state.global_step, "evaluations": evaluations,
            "width": {"definition": "||Z||_F / (sqrt(llmmscale) ||M||_F) per factor and layer (llmm.width)",
                      "history": [{"step": entry["step"], **entry["width"]} for entry in trainer.state.log_history
                                  if "width" in entry],
                      "final_per_layer": distribution_width(model)},
            "noise_width_search": self.width_search, "noise_width": noise_width_in_use(model),
            "history": trainer.state.log_history, "resumed_from": self.resumed_from,
            "wall_time_s": time.time() - self.started, "complete": True,
        }

    def save(self, trainer, model, tokenizer, results: dict) -> dict:
        causal_lm.save_run(model, tokenizer, self.output_dir, self.settings.model_name_or_path,
                           causal_lm.in_process_loftq(self.settings), state_dict=self.adapter_state)
        fileio.write_json(self.output_dir / "results.json", results)
        fileio.plot_curves(self.output_dir / "curves.png", causal_lm.curves(results["history"]),
                           xlabel="optimizer step")
        cli.logger.info("results -> %s", self.output_dir / "results.json")
        return results


def train(argv=None) -> dict:
    return McqRecipe(parse_settings(argv), tables.read_table(TABLE, BLOCKS)).run()
