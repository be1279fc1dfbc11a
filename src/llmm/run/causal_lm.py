"""Shared setup of the causal-LM entry points (train_nlg, train_gsm8k, test_gsm8k): flags, backbone, adapter, Trainer.

Not run directly. A training script supplies its table and an ``encode(tokenizer, settings, record)`` function:

    settings = parse_settings(table, argv)              # table defaults or the row --model names, + flags
    train(settings, task, encode)                       # HF Trainer; writes adapter/, mean_adapter/, results, plot

Checkpoints go to OUTPUT_DIR/checkpoints/checkpoint-N (--resume_from_checkpoint; no value: the newest). Methods
(SPEC §3 baselines): llmm, loftq (K = 0), qlora (LoRA init, K = 0). The model is an _init.sh directory (LoftQ
backbone + llmm_init/ with the means) or a plain checkpoint with --init lora / loftq (in-process LoftQ needs
full-precision weights). Sharded runs (README "Larger models") store NF4 in the compute dtype and skip
prepare_model_for_kbit_training: its float32 upcast of norms and embeddings would mix dtypes in FSDP1's flat
parameters and double their memory."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
from accelerate import PartialState
from peft import prepare_model_for_kbit_training
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                          TrainingArguments)

from llmm import LlmmConfig, get_llmm_model, load_llmm_model, outdirs, sharding, stats
from llmm.model import check_target_names, init_from_adapter, keep_cpu_4bit_trainable
from llmm.predict import sampled_outputs
from llmm.run import adapters, checkpoints, cli, fileio, schema, tables, width_search
from llmm.run import trainer as training
from llmm.run.recipe import Recipe, save_run
from llmm.tasks.calibration import cpu_4bit_as_plain_peft
from llmm.tasks.prompts import load_records

BLOCKS = schema.FAMILY_BLOCKS["causal_lm"]


# --- settings ------------------------------------------------------------------------------------------------------

def init_adapter_dir(model_name_or_path: str) -> Path | None:
    """The llmm_init/ of an _init.sh directory, or None for a plain checkpoint."""
    path = Path(model_name_or_path) / "llmm_init"
    return path if path.is_dir() else None


def table_settings(table: dict, args: argparse.Namespace, task_columns: tuple[str, ...] = ()) -> dict:
    """The table's defaults, or the row --model names (other key flags such as --rank complete the name; a table
    without a model key is named by any key flag), then every flag given. From the defaults, ``task_columns``
    (e.g. the dataset) come from the rows of the given --task when they agree."""
    given = {key: getattr(args, key) for key in table["keys"] if getattr(args, key, None) is not None}
    rows = tables.table_rows(table)
    names_a_row = given.get("model") is not None if "model" in table["keys"] else bool(given)
    if names_a_row:
        named = [row for row in rows if all(row[key] == value for key, value in given.items())]
        if len(named) != 1:
            existing = sorted({tuple(row[key] for key in table["keys"]) for row in rows}, key=str)
            problem = "no row" if not named else f"{len(named)} rows"
            raise ValueError(f"{problem} for {given} in the table; rows ({', '.join(table['keys'])}): {existing}. "
                             "Name one, or drop --model to run from the table's defaults plus flags")
        settings = {**named[0], "table_row": {key: named[0][key] for key in table["keys"]}}
    else:
        settings = {**table.get("defaults", {}), "table_row": None}
        for column in task_columns:
            values = {row[column] for row in rows if row.get("task") == given.get("task") and column in row}
            if len(values) == 1:
                settings[column] = values.pop()
    settings.update({key: value for key, value in vars(args).items() if value is not None})
    return settings


def scope_dataset_config(settings, args: argparse.Namespace) -> None:
    """The table's dataset_config belongs to the table's dataset: another --data gets none without --dataset_config."""
    data = settings.get("data")
    if data and data != settings.dataset and getattr(args, "dataset_config", None) is None:
        settings.dataset_config = None


def parse_settings(table: dict, argv=None, description: str = "", task_columns: tuple[str, ...] = (),
                   required_keys: tuple[str, ...] = ()) -> schema.CausalLMRun:
    """Table defaults or a named row, then flags; inconsistent choices fail before any loading."""
    parser = cli.ArgumentParser(description=description, allow_abbrev=False)
    cli.add_output_flags(parser)
    checkpoints.add_resume_flag(parser)
    tables.add_setting_flags(parser, table, BLOCKS, also=("model_name_or_path", "data", "eval_data", "target_modules",
                                                          "max_train_samples", "max_eval_samples"),
                             required=required_keys, row_choices=required_keys)
    args = parser.parse_args(argv)
    schema.take_renamed(args, BLOCKS)
    settings = schema.CausalLMRun.of({**tables.offered_defaults(BLOCKS, args),
                                      **table_settings(table, args, task_columns)})
    adapters.check_settings(settings, BLOCKS)
    scope_dataset_config(settings, args)
    if not (settings.get("data") or settings.dataset):
        raise ValueError("no dataset: pass --data (a hub id, dataset directory or .json/.jsonl file)")
    method = settings.method
    adapters.set_method_k(settings, args.K, "loftq" if settings.init == "loftq" else "qlora")
    if method != "llmm":
        fixed_init = {"qlora": "lora", "loftq": "loftq"}[method]
        if args.init not in (None, fixed_init):
            raise ValueError(f"--method {method} means --init {fixed_init}; drop --init {args.init}")
        settings.init = fixed_init
    adapters.check_settings(settings, BLOCKS)
    fileio.check_data_paths(data=settings.get("data"), eval_data=settings.get("eval_data"))
    if settings.get("eval_data") and not str(settings.eval_data).endswith((".json", ".jsonl")):
        raise ValueError(f"--eval_data {settings.eval_data!r}: it takes a .json/.jsonl file of held-out records; for "
                         "a split of a dataset directory pass it as --data with --eval_split NAME")
    for name in ("init_dir", "base_model"):
        if args.model_name_or_path is not None and getattr(args, name) is not None:
            raise ValueError(f"--{name} names the checkpoint of a run without --model_name_or_path; this command "
                             f"gives --model_name_or_path: drop one of them")
    if args.model_name_or_path is None:
        key = "base_model" if method == "qlora" else "init_dir"
        if settings[key] is None:
            raise ValueError("no model: pass --model_name_or_path (an _init.sh directory, a hub id or a local "
                             "checkpoint), or --model to use a table row's")
        settings.model_name_or_path = settings[key]
        if key == "init_dir" and not Path(settings[key]).is_dir():
            raise FileNotFoundError(f"the row's init_dir {settings[key]!r} does not exist: create it with bash "
                                    "_init.sh (configs/quantize.yaml) or pass --model_name_or_path")
    fileio.check_model_path(settings.model_name_or_path)
    init_dir = init_adapter_dir(settings.model_name_or_path)
    if init_dir is not None and method == "qlora":
        raise ValueError(f"--method qlora needs the original checkpoint (the row's base_model), not the _init.sh "
                         f"directory {settings.model_name_or_path!r}: its backbone is LoftQ's Q = quant(W - gBA)")
    if init_dir is None and settings.init == "loftq" and settings.load_in_4bit:
        raise ValueError("LoftQ init needs the full-precision weights, not a 4-bit backbone: pass an _init.sh "
                         "directory (bash _init.sh PRESET), or --load_in_4bit false, or --init lora")
    if init_dir is not None:
        adopt_init_dir(init_dir, settings, args)
    settings.init_source = fileio.real_path(str(init_dir)) if init_dir else f"{settings.init} (in-process)"
    engine = sharding.requested_engine()
    if engine != "none" and in_process_loftq(settings):
        raise ValueError(f"in-process LoftQ is not supported under {engine} (each process would quantize the whole "
                         "model, and the backbone/ it saves is sharded): make an _init.sh directory (bash _init.sh "
                         "PRESET) and pass it as --model_name_or_path, or --init lora")
    if settings.eval_split == "heldout" and settings.eval_size < 1:
        raise ValueError(f"eval_size must be >= 1 for eval_split heldout, got {settings.eval_size}")
    check_width_search(settings)
    adapters.check_flags_apply(settings, adapters.given_flags(args, table["keys"]))
    if method == "qlora" and not settings.load_in_4bit:
        raise ValueError(f"--method qlora is LoRA on the NF4-quantized checkpoint, and --load_in_4bit false would "
                         f"train it in {settings.dtype}, unquantized: drop --load_in_4bit false")
    return settings


def check_width_search(settings) -> None:
    """The width search needs K > 0 and a held-out split that is not the test split."""
    search = settings.noise_width_search
    if search == "none":
        return
    if not settings.K > 0:
        raise ValueError(f"noise_width_search {search} scales the Llmm noise, which --method {settings.method} "
                         f"(K = {settings.K}) does not have: use --method llmm with K > 0, or --noise_width_search "
                         "none")
    if not settings.get("eval_data") and settings.eval_split == "test":
        raise ValueError(f"noise_width_search {search} chooses the width on the held-out split, which here is the "
                         "test split: pass --eval_split heldout --eval_size N (records held out of train) or "
                         "--eval_data FILE (a validation file)")


# --- model ---------------------------------------------------------------------------------------------------------

def quant_storage(settings) -> str:
    """The dtype bitsandbytes packs NF4 weights in; ``auto``: uint8, or under FSDP / DeepSpeed the compute dtype
    (FSDP shards only floating tensors of one dtype per unit)."""
    storage = settings.get("bnb_4bit_quant_storage", "auto")  # not a multiple-choice setting
    if storage != "auto":
        return storage
    return settings.dtype if sharding.requested_engine() != "none" else "uint8"


def load_backbone(settings):
    """(model, tokenizer): bitsandbytes NF4 or LLM.int8 on this process's device (sharded: the engine places
    them), or ``dtype`` weights on CPU. A missing pad token becomes unk (or eos), so embeddings keep size."""
    dtype = getattr(torch, settings.dtype)
    kwargs = {"dtype": dtype}
    if settings.get("load_in_8bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif settings.load_in_4bit:
        settings.bnb_4bit_quant_storage_used = storage = quant_storage(settings)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False, bnb_4bit_quant_storage=getattr(torch, storage))
    if "quantization_config" in kwargs and sharding.requested_engine() == "none":
        kwargs["device_map"] = {"": PartialState().device}
    model = fileio.load_pretrained(AutoModelForCausalLM, settings.model_name_or_path, **kwargs)
    tokenizer = fileio.load_pretrained(AutoTokenizer, settings.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def adopt_init_dir(init_dir: Path, settings, args) -> None:
    """Train from an _init.sh directory's LoftQ means (not with --init lora): its adapter must fit the settings, and
    its LoftQ settings replace the table's (a flag in ``args`` that differs is an error)."""
    if args.init == "lora":
        raise ValueError("an _init.sh directory brings LoftQ means; for --init lora pass the original checkpoint")
    check_init_adapter(init_dir, settings)
    given = {name for name in adapters.INIT_DIR_LOFTQ if getattr(args, name, None) is not None}
    adapters.adopt_init_dir_settings(settings.model_name_or_path, settings, given)


def check_init_adapter(init_dir: Path, settings) -> LlmmConfig:
    """The init adapter's config; its rank and lora_alpha must be the settings' (the LoftQ means depend on both), and
    its directory a causal LM's."""
    made = adapters.init_dir_settings(init_dir.parent)
    if made.get("task_type", "causal_lm") != "causal_lm":
        raise ValueError(f"{str(init_dir.parent)!r} was made with --task_type {made['task_type']} (a classifier): "
                         "use it with train_glue, or make a causal-LM directory (_init.sh --task_type causal_lm)")
    saved = LlmmConfig.from_pretrained(str(init_dir))
    adapters.check_init_targets(init_dir, saved.target_modules, settings.target_modules)
    for name, key in (("r", "rank"), ("lora_alpha", "lora_alpha")):
        if getattr(saved, name) != settings[key]:
            raise ValueError(f"{init_dir} holds LoftQ means for {name}={getattr(saved, name)} but the settings say "
                             f"{key}={settings[key]}: use the _init.sh directory made with that {key}")
    return saved


def attach_adapter(model, settings):
    """An Llmm adapter per the settings: LoRA / in-process LoftQ init, or the trainable LoftQ means of an _init.sh
    directory with the settings' K (the init's directions are zero, so any K starts from the same model)."""
    overrides = dict(scale=float(settings.llmmscale), scaled_gradient=settings.scaled_gradient,
                     lora_dropout=settings.lora_dropout, eval_noise=settings.eval_noise,
                     noise_per_example=settings.noise_per_example)
    init_dir = init_adapter_dir(settings.model_name_or_path)
    if init_dir is None:
        targets = tables.default_targets(model.config, settings.target_modules)
        peft_model = get_llmm_model(model, adapters.llmm_config(settings, targets))
    elif (saved := check_init_adapter(init_dir, settings)).k == settings.K:
        peft_model = load_llmm_model(model, str(init_dir), is_trainable=True, k=settings.K, **overrides)
    else:
        peft_model = init_from_adapter(model, str(init_dir), dataclasses.replace(saved, k=settings.K, **overrides))
    for parameter in peft_model.parameters():
        if parameter.numel() == 0:  # K = 0: the (0, ...) direction tensors have nothing to train
            parameter.requires_grad_(False)
    return peft_model


def prepare_for_training(model, settings):
    """The backbone made ready for the adapters: over 4 bits (``prepare_kbit_training``) PEFT's
    prepare_model_for_kbit_training; before in-process LoftQ, moved to the training device for LoftQ's SVDs
    (a 7B model takes hours on CPU, minutes on a GPU)."""
    model.config.use_cache = False
    if settings.load_in_4bit and settings.prepare_kbit_training and sharding.requested_engine() == "none":
        checkpointing = settings.gradient_checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs(settings) if checkpointing else None)
    elif settings.load_in_4bit and settings.gradient_checkpointing:
        model.enable_input_require_grads()  # what prepare_model_for_kbit_training adds for checkpointing, no upcast
    if in_process_loftq(settings):
        model = model.to(PartialState().device)
    keep_cpu_4bit_trainable(model)
    return model


def checkpointing_kwargs(settings) -> dict:
    """``use_reentrant`` from the settings (PEFT's FSDP-QLoRA recipe: True)."""
    return {"use_reentrant": bool(settings.get("gradient_checkpointing_reentrant", False))}


def in_process_loftq(settings) -> bool:
    """True when LoftQ quantizes a plain checkpoint here: the backbone Q then exists only in this run."""
    return settings.init == "loftq" and init_adapter_dir(settings.model_name_or_path) is None


# --- data ----------------------------------------------------------------------------------------------------------

def as_dataset(records: list[dict]):
    """datasets.Dataset of JSON records; a field some records lack is None there (from_list keeps only the
    first record's fields)."""
    import datasets

    fields = dict.fromkeys(field for record in records for field in record)
    return datasets.Dataset.from_dict({field: [record.get(field) for record in records] for field in fields})


def train_eval_records(settings, task: str):
    """(train, held-out, where the held-out set comes from) as datasets.Dataset."""
    import datasets

    source = settings.get("data") or settings.dataset
    splits = {name: split if isinstance(split, datasets.Dataset) else as_dataset(split)
              for name, split in load_records(source, task, settings.dataset_config).items()}
    if "train" not in splits:
        raise ValueError(f"{source} has no 'train' split (splits: {sorted(splits)})")
    train, eval_split = splits["train"], settings.eval_split
    if settings.get("eval_data"):
        held_out, where = as_dataset(load_records(settings.eval_data, task)["train"]), settings.eval_data
    elif eval_split == "heldout":
        if settings.eval_size >= len(train):
            raise ValueError(f"eval_size {settings.eval_size} leaves no training data ({len(train)} records): "
                             "pass a smaller --eval_size, --eval_split test (a dataset with a test split) or "
                             "--eval_data FILE")
        parts = train.train_test_split(test_size=settings.eval_size, shuffle=True, seed=settings.data_seed)
        train, held_out = parts["train"], parts["test"]
        where = f"{settings.eval_size} records held out of train (seed {settings.data_seed})"
    elif eval_split in splits:
        held_out, where = splits[eval_split], f"{source} [{eval_split}]"
    else:
        raise ValueError(f"{source} has no {eval_split!r} split (splits: {sorted(splits)}): pass --eval_data FILE "
                         "or --eval_split heldout")
    if settings.max_train_samples:
        train = train.select(range(min(settings.max_train_samples, len(train))))
    if settings.max_eval_samples:
        held_out = held_out.select(range(min(settings.max_eval_samples, len(held_out))))
    return train, held_out, where


# --- training ------------------------------------------------------------------------------------------------------

def held_out_nll(model, dataset, collator, settings):
    """nll(m) of the width search: the held-out NLL per target token of the Monte-Carlo prediction,
    -log (1/N sum_n p_n(token)), under mc_samples networks from the seed's own streams (llmm.predict). Computed as
    the Trainer's held-out loss is (LlmmTrainer.evaluate, CausalLMTrainer.prediction_step): the same batches (as one
    process evaluates them), under its mixed-precision autocast (the forward accelerate wrapped: a bf16 run's
    eval_loss is a bf16-autocast one), CPU 4-bit layers as freshly loaded, each token's log-softmax in float32,
    summed over the split's target tokens; so nll(0), the mean network, is the run's eval_loss (to the float32
    rounding of each batch's mean)."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.per_device_eval_batch_size,
                                         collate_fn=collator)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in loader]
    n = settings.mc_samples

    def nll(m: float) -> float:
        total, count = 0.0, 0
        with training.training_streams_kept(model), cpu_4bit_as_plain_peft(model):
            for batch in batches:
                labels = batch["labels"]
                targets = labels[:, 1:].clamp(min=0).unsqueeze(-1)  # -100 -> a placeholder, masked below
                log_probs = sampled_outputs(  # each network's log-probability of every next label token
                    model, batch, n, seed=settings.seed,
                    transform=lambda logits: logits[:, :-1].log_softmax(dim=-1).gather(-1, targets).squeeze(-1))
                predictive = torch.logsumexp(log_probs, dim=0) - math.log(n)
                scored = labels[:, 1:] != -100
                total -= predictive[scored].double().sum().item()
                count += int(scored.sum())
        return total / count

    return nll


def curves(history: list[dict]) -> dict:
    lines = {"train": [(h["step"], h["loss"]) for h in history if "loss" in h],
             "held-out": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]}
    as_xy = {name: ([s for s, _ in points], [v for _, v in points]) for name, points in lines.items() if points}
    perplexity = {name: (xs, [math.exp(min(v, 50)) for v in ys]) for name, (xs, ys) in as_xy.items()}
    return {"loss": as_xy, "perplexity": perplexity}


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError for a (finite) loss above ~709."""
    return math.exp(loss) if loss < 700 else math.inf


def final_evaluation(trainer) -> dict:
    """The held-out evaluation at the last step (the Trainer's log entry; evaluated now if training did not)."""
    history = trainer.state.log_history
    last_eval = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last_eval is None or last_eval["step"] != trainer.state.global_step:
        trainer.evaluate()
        last_eval = history[-1]
    return last_eval


class CausalLMTrainer(training.LlmmTrainer):
    """The Llmm Trainer whose held-out loss is the split's NLL per target token. The Trainer's own weighs each
    batch's token mean by its records, so it changed with per_device_eval_batch_size. Under data parallelism the
    records accelerate repeats to even the processes' last batches count as well."""

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
        self.held_out_sums = [0.0, 0]  # (NLL, target tokens) of this process's batches
        output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        sums = torch.tensor(self.held_out_sums, dtype=torch.float64, device=self.args.device)
        nll, tokens = self.accelerator.reduce(sums, reduction="sum").tolist()
        if tokens > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = nll / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        tokens = int((inputs["labels"][:, 1:] != -100).sum())  # the batch loss is the mean over these
        if loss is not None and tokens:
            self.held_out_sums[0] += loss.double().item() * tokens
            self.held_out_sums[1] += tokens
        return loss, logits, labels


class CausalLMRecipe(Recipe):
    """GSM8K, Alpaca and HH-RLHF: the HF Trainer on (source, target) pairs encoded by ``encode(tokenizer,
    settings, record)``; held-out loss and perplexity."""

    blocks = BLOCKS

    def __init__(self, settings, task: str, encode):
        super().__init__(settings)
        self.task, self.encode = task, encode

    def derive(self):
        """--target_modules checked on the model's config on the meta device, before minutes of loading weights."""
        if self.settings.get("target_modules"):
            config = fileio.load_pretrained(AutoConfig, self.settings.model_name_or_path)
            with torch.device("meta"):
                check_target_names(AutoModelForCausalLM.from_config(config), self.settings.target_modules)

    def load_data(self):
        self.train_set, self.held_out, self.where = train_eval_records(self.settings, self.task)

    def training_arguments(self, resume: bool) -> TrainingArguments:
        settings = self.settings
        optim = settings.optim
        if optim.startswith("paged_") and not torch.cuda.is_available():
            cli.logger.warning("%s needs CUDA: using adamw_torch on this machine", optim)
            optim = "adamw_torch"
        settings.optim_used = optim
        checkpointing = settings.gradient_checkpointing
        return TrainingArguments(
            **training.shared_arguments(settings), output_dir=str(self.checkpoint_dir), max_steps=settings.max_steps,
            optim=optim, eval_strategy="steps", eval_steps=settings.eval_steps, eval_on_start=not resume,
            prediction_loss_only=True, logging_steps=settings.logging_steps, logging_first_step=True,
            save_strategy="steps", save_steps=settings.save_steps, data_seed=settings.data_seed,
            bf16=settings.dtype == "bfloat16", fp16=settings.dtype == "float16",
            activation_checkpointing=checkpointing,  # transformers' new name for gradient_checkpointing
            activation_checkpointing_kwargs=checkpointing_kwargs(settings) if checkpointing else None,
            remove_unused_columns=False, label_names=["labels"],
        )

    def load_model(self, arguments):
        model, tokenizer = load_backbone(self.settings)
        peft_model = attach_adapter(prepare_for_training(model, self.settings), self.settings)
        peft_model.print_trainable_parameters()
        tokenizer.padding_side = "right"
        return peft_model, tokenizer

    def datasets(self, tokenizer):
        def encoded(records, what: str):
            data = records.map(lambda r: self.encode(tokenizer, self.settings, r), remove_columns=records.column_names,
                               desc="tokenize")
            kept = data.filter(lambda r: any(label != -100 for label in r["labels"][1:]), desc="targets")
            if not len(kept):  # the loss would be 0 / 0
                raise ValueError(f"no {what} record keeps a target token within --max_length "
                                 f"{self.settings.max_length} (the question fills it): raise --max_length")
            if len(kept) < len(data):
                cli.logger.warning("%d of %d %s records have no target token within --max_length: left out",
                                   len(data) - len(kept), len(data), what)
            return kept

        return encoded(self.train_set, "training"), encoded(self.held_out, "held-out")

    def make_trainer(self, model, tokenizer, arguments, train_set, held_out):
        return CausalLMTrainer(model=model, args=arguments, train_dataset=train_set, eval_dataset=held_out,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
                               processing_class=tokenizer)

    width_search = None  # the width search's record (after_training), None without one

    def after_training(self, trainer, model, tokenizer) -> None:
        """The width search on the held-out split; the chosen m goes into the saved adapter."""
        settings = self.settings
        if settings.noise_width_search == "none":
            return
        final_evaluation(trainer)  # the held-out loss of the trained run as evaluated in training (m = 1), first
        nll = held_out_nll(model, trainer.eval_dataset, trainer.data_collator, settings)  # nll(0): that loss
        found = width_search.search_width(model, nll, settings, f"on {len(trainer.eval_dataset)} held-out records")
        self.width_search = {**found, "split": self.where, "n_held_out": len(trainer.eval_dataset),
                             "mc_samples": settings.mc_samples, "seed": settings.seed}

    def finish(self, trainer, outcome, model, tokenizer) -> dict:
        settings, history = self.settings, trainer.state.log_history
        last_eval = final_evaluation(trainer)
        first_eval = next(h for h in history if "eval_loss" in h)
        return {
            "task": self.task, "method": settings.method, "K": settings.K,
            "model": settings.model_name_or_path,
            "eval_loss": last_eval["eval_loss"], "eval_perplexity": perplexity(last_eval["eval_loss"]),
            "eval_loss_at_start": first_eval["eval_loss"],
            "eval_perplexity_at_start": perplexity(first_eval["eval_loss"]), "held_out": self.where,
            "n_train": len(trainer.train_dataset), "n_held_out": len(trainer.eval_dataset),
            "train_loss": outcome.training_loss, "global_step": trainer.state.global_step,
            "resumed_from": self.resumed_from, "wall_time_s": time.time() - self.started, "history": history,
            "seed": settings.seed, "cell": {**stats.cell_of(settings), "task": self.task},  # what tables pool by
            "noise_width_search": self.width_search, "noise_width": width_search.noise_width_in_use(model),
        }

    def save(self, trainer, model, tokenizer, results: dict) -> dict:
        save_run(model, tokenizer, self.output_dir, self.settings.model_name_or_path, in_process_loftq(self.settings),
                 state_dict=self.adapter_state)
        fileio.write_json(self.output_dir / "results.json", results)
        for folder in sorted(self.output_dir.iterdir()):  # test_gsm8k.sh's <run>/test-*: scores of the replaced adapter
            if (folder / "predictions.jsonl").is_file() and '"accuracy"' in fileio.read_text_or_empty(
                    folder / "results.json"):
                outdirs.remove_stale(folder, "they tested the adapter before this resume (test it again)")
        fileio.plot_curves(self.output_dir / "curves.png", curves(results["history"]), xlabel="optimizer step")
        cli.logger.info("held-out loss %.4f, perplexity %.2f -> %s", results["eval_loss"], results["eval_perplexity"],
                        self.output_dir)
        return results
