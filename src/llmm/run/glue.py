"""GLUE on an encoder as a run recipe (scripts.train_glue, scripts.eval_glue): settings, the encoder quantized as
--method says and wrapped with Llmm adapters (the head in full precision), the Trainer with Monte-Carlo evaluation,
results per epoch (best and last), predictions and the saved adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          TrainerCallback, TrainingArguments)

import llmm
from llmm import outdirs, stats
from llmm.model import check_target_names
from llmm.embedding import embedding_targets
from llmm.tasks.glue import GlueTask, get_task, load_glue, mc_outputs, predict, score, tokenize
from llmm.quant import fake_quantize
from llmm.run import cli, width_search
from llmm.run.recipe import Recipe, save_run
from llmm.run.checkpoints import add_resume_flag
from llmm.run.trainer import LlmmTrainer, shared_arguments
from llmm.run.adapters import (INIT_DIR_LOFTQ, adopt_init_dir_settings, check_flags_apply, check_init_targets,
                               check_settings, given_flags, head_modules, init_dir_settings, llmm_config, set_method_k)
from llmm.run.fileio import check_data_paths, load_pretrained, plot_curves, write_json
from llmm.run.quantize import embeddings_quantized
from llmm.run.schema import FAMILY_BLOCKS, GlueRun, take_renamed
from llmm.run.tables import (CONFIGS, add_setting_flags, default_embedding_targets, default_targets, offered_defaults,
                             read_table, resolve_settings)


TABLE = CONFIGS / "glue.yaml"
BLOCKS = FAMILY_BLOCKS["glue"]


def resolve(argv: list[str] | None) -> tuple[GlueTask, GlueRun]:
    """Task and settings: table defaults < row < flags, then what --method implies; bad values fail here."""
    table = read_table(TABLE, BLOCKS)
    parser = cli.ArgumentParser(description="Fine-tune an encoder on one GLUE task with Llmm adapters over a "
                                     "LoftQ-quantized backbone, or a baseline.", allow_abbrev=False)
    cli.add_output_flags(parser, required=False)
    add_resume_flag(parser)
    add_setting_flags(parser, table, BLOCKS, also=("method", "model", "data_dir", "train_file", "validation_file",
                                                   "eval_noise", "mc_samples", "target_modules", "max_steps"),
                      required=table["keys"])
    args = parser.parse_args(argv)
    take_renamed(args, BLOCKS)
    task = get_task(args.task)
    if args.logging_steps is not None:
        raise ValueError("GLUE logs the training loss at every evaluation (each epoch, or every --eval_steps): drop "
                         "--logging_steps and set --eval_steps")
    settings = GlueRun.of({**offered_defaults(BLOCKS, args), **resolve_settings(table, args)})
    settings.quantize_embeddings = embeddings_quantized(settings.quantize_embeddings, "seq_cls")  # null: on
    check_settings(settings, BLOCKS)  # as given; again below with what --method and the _init.sh directory imply
    method = settings.method
    set_method_k(settings, args.K, "loftq")
    settings.init = "loftq" if method in ("llmm", "loftq") else "lora"
    if method == "lora":
        if args.quantize_embeddings:
            raise ValueError("--method lora keeps the backbone in full precision: drop --quantize_embeddings")
        settings.quantize_embeddings = False
    if settings.gaussian_embeddings and (method != "llmm" or settings.K == 0 or not settings.quantize_embeddings):
        raise ValueError("--gaussian_embeddings true needs --method llmm (K > 0) with --quantize_embeddings")
    settings.backbone = "full-precision" if method == "lora" else f"{settings.quant} {settings.bits}-bit"
    if method != "lora" and not settings.quantize_embeddings:
        settings.backbone += " (fp embeddings)"
    check_init_dir(settings, given={name for name in INIT_DIR_LOFTQ if getattr(args, name, None) is not None})
    check_settings(settings, BLOCKS)
    check_data_paths(data_dir=settings.get("data_dir"), train_file=settings.get("train_file"),
                     validation_file=settings.get("validation_file"))
    search = settings.noise_width_search
    if search != "none" and (task.is_regression or not settings.K > 0):
        raise ValueError(f"noise_width_search {search} chooses the width of the Llmm noise by the dev NLL of a "
                         "classifier: it needs --method llmm (K > 0) and a classification task, not "
                         f"{task.name} with K = {settings.K}; or pass --noise_width_search none")
    check_flags_apply(settings, given_flags(args, table["keys"]))
    return task, settings


def check_init_dir(settings: GlueRun, given: set[str] = frozenset()) -> None:
    """An _init.sh directory (backbone with Q + llmm_init/) is used as it is: its quantization must be the row's;
    its other LoftQ settings (iterations, SVD) replace the table's, and a flag in ``given`` that differs is an error."""
    model_dir = Path(settings.model).expanduser()
    if not (model_dir / "llmm_init").is_dir():
        return
    if settings.method in ("lora", "qlora"):
        raise ValueError(f"{str(model_dir)!r} is an _init.sh LoftQ directory: --method {settings.method} needs "
                         "the original checkpoint as --model")
    made = init_dir_settings(model_dir)
    if not made:
        raise FileNotFoundError(f"{str(model_dir / 'quantize_report.json')!r} does not exist: the _init.sh "
                                "directory is incomplete; make it again with _init.sh")
    for name in ("quant", "bits", "rank", "lora_alpha", "quantize_embeddings"):
        if made[name] != settings[name]:
            raise ValueError(f"{str(model_dir)!r} was quantized with {name}={made[name]!r} but the settings say "
                             f"{settings[name]!r}: pass --{name} {made[name]} or quantize again with _init.sh")
    adopt_init_dir_settings(model_dir, settings, given)
    settings.init_dir = str(model_dir / "llmm_init")
    check_init_targets(settings.init_dir, llmm.LlmmConfig.from_pretrained(settings.init_dir).target_modules,
                       settings.target_modules)
    settings.backbone += " (LoftQ directory)"


def load_model(model_name_or_path: str, task: GlueTask, init_dir: bool = False):
    """Tokenizer and AutoModelForSequenceClassification in float32 (fresh head) from a hub id or a local directory.
    An _init.sh directory (``init_dir``) holds the random head of its quantization: it is drawn afresh here."""
    labels = {} if task.is_regression else {"id2label": dict(enumerate(task.label_names)),
                                            "label2id": {n: i for i, n in enumerate(task.label_names)}}
    tokenizer = load_pretrained(AutoTokenizer, model_name_or_path)
    model = load_pretrained(AutoModelForSequenceClassification, model_name_or_path, num_labels=task.num_labels,
                            ignore_mismatched_sizes=True, dtype=torch.float32, **labels)  # a fresh head if it differs
    if init_dir:
        fresh_head(model)
    return tokenizer, model


@torch.no_grad()
def fresh_head(model) -> None:
    """The task head beside the encoder (DeBERTa's pooler and classifier, BERT's classifier) drawn afresh from torch's
    generator (the run's seed), as transformers initialises a head the checkpoint lacks."""
    for name, child in model.named_children():
        for module in child.modules() if name != model.base_model_prefix else ():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, model.config.initializer_range)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


def adapted_modules(model, settings: GlueRun) -> list[str]:
    """The target modules (given, else configs/targets.yaml's) plus, with quantize_embeddings, the model's embedding
    tables; the same list when the settings already hold it."""
    targets = default_targets(model.config, settings.target_modules)
    if settings.quantize_embeddings:
        tables = embedding_targets(model, default_embedding_targets(model.config))
        targets = list(dict.fromkeys([*targets, *sorted({path.split(".")[-1] for path in tables})]))
    return targets


def wrap_model(model, settings: GlueRun):
    """Quantize as --method says and wrap with Llmm adapters; the head modules stay full precision and trainable.
    From an _init.sh directory the backbone already holds Q: the adapters start from its LoftQ means."""
    heads = head_modules(model)
    targets = adapted_modules(model, settings)
    layer_settings = settings.copy(eval_noise="sample" if settings.eval_noise == "sample" else "mean")
    if settings.get("init_dir"):
        layer_settings.init = "lora"  # the means come from the directory's llmm_init/, not a new LoftQ
    config = llmm_config(layer_settings, targets, modules_to_save=list(heads), task_type="SEQ_CLS",
                         gaussian_embeddings=settings.gaussian_embeddings)
    if settings.method == "qlora":  # same quantizer as LoftQ, but no low-rank compensation
        with torch.no_grad():
            for name, module in model.named_modules():
                quantizable = isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                if quantizable and check_target_module_exists(config, name):
                    module.weight.copy_(fake_quantize(module.weight, settings.bits, settings.quant,
                                                      config.loftq_block_size))
    settings.target_modules, settings.modules_to_save = targets, heads
    if settings.get("init_dir"):
        return llmm.init_from_adapter(model, settings.init_dir, config)
    return llmm.get_llmm_model(model, config)


class GlueTrainer(LlmmTrainer):
    """The Llmm Trainer; with ``mc_samples`` set, evaluation averages that many sampled networks per batch, network n
    from stream n of ``mc_seed`` (llmm.tasks.glue.mc_outputs, as scripts.eval_glue --mode mc draws them)."""

    def __init__(self, *args, mc_samples: int | None = None, mc_seed: int | None = None, regression: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.mc_samples, self.mc_seed, self.regression = mc_samples, mc_seed, regression
        self.evaluated = {}  # split -> (outputs, labels) of its newest evaluation (ResultsRecorder saves the best's)
        # The classifier's loss is its batch mean whatever num_items_in_batch says, though its forward takes **kwargs:
        # so the Trainer must divide it by the accumulation steps (else loss and gradients grow with them).
        self.model_accepts_loss_kwargs = False

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        self.evaluated[metric_key_prefix.removeprefix("eval_")] = (output.predictions, output.label_ids)
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.mc_samples:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]
        outputs = mc_outputs(model, inputs, self.mc_samples, self.mc_seed, self.regression)
        loss = F.mse_loss(outputs.squeeze(-1), labels.float()) if self.regression else F.nll_loss(outputs, labels)
        return loss.detach(), None if prediction_loss_only else outputs, labels


class ResultsRecorder(TrainerCallback):
    """Training loss and dev metrics per epoch, read from the Trainer's log history (which a resumed run restores
    from its checkpoint); rewrites results.json (atomically) after every evaluation, and predictions-best.json (the
    outputs the best epoch's dev metrics were computed from) after every evaluation that is the best so far."""

    SKIP = ("_runtime", "_samples_per_second", "_steps_per_second")

    def __init__(self, out_dir: Path, task: GlueTask, header: dict):
        self.out_dir, self.task, self.header, self.epochs = out_dir, task, header, []
        self.evaluated = {}  # the trainer's (GlueTrainer.evaluated)

    def read(self, log_history: list[dict]) -> list[dict]:
        """One entry per logged epoch (or step): {epoch, step, train_loss, dev: {split: {metric: value}}}."""
        splits = sorted(self.task.dev_splits, key=len, reverse=True)  # longest first: prefixes may overlap
        epochs = {}
        for log in log_history:
            dev = {}
            for key, value in log.items():
                split = next((s for s in splits if key.startswith(f"eval_{s}_")), None)
                if split and not key.endswith(self.SKIP):
                    dev.setdefault(split, {})[key[len(f"eval_{split}_"):]] = value
            if "loss" not in log and not dev:
                continue
            epoch = round(log.get("epoch") or 0.0, 4)
            entry = epochs.setdefault(epoch, {"epoch": epoch, "step": log["step"], "train_loss": None, "dev": {}})
            entry["train_loss"] = log.get("loss", entry["train_loss"])
            for split, metrics in dev.items():
                entry["dev"].setdefault(split, {}).update(metrics)
        self.epochs = list(epochs.values())
        return self.epochs

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            best = self.write(state.log_history, complete=False)["best"]
            if best is not None and best["step"] == state.global_step:
                self.write_best_predictions(best)

    def write_best_predictions(self, best: dict) -> None:
        record = {"epoch": best["epoch"], "step": best["step"]}
        for split, (outputs, labels) in self.evaluated.items():
            if split in best["dev"]:
                record[split] = {"metrics": score(self.task, outputs, labels), "outputs": outputs.tolist(),
                                 "labels": labels.tolist()}
        write_json(self.out_dir / "predictions-best.json", record)

    def _main_value(self, entry: dict):
        return entry["dev"].get(self.task.dev_splits[0], {}).get(self.task.main_metric)

    def write(self, log_history: list[dict], complete: bool) -> dict:
        epochs = self.read(log_history)
        scored = [e for e in epochs if self._main_value(e) is not None]
        results = {**self.header, "main_metric": self.task.main_metric, "main_split": self.task.dev_splits[0],
                   "epochs": epochs, "best": max(scored, key=self._main_value, default=None),
                   "last": epochs[-1] if epochs else None, "complete": complete}
        write_json(self.out_dir / "results.json", results)
        return results

    def plot(self) -> None:
        def line(key_of):
            points = [(e["epoch"], key_of(e)) for e in self.epochs if key_of(e) is not None]
            return [p[0] for p in points], [p[1] for p in points]

        metric = self.task.main_metric
        dev = {split: line(lambda e, s=split: e["dev"].get(s, {}).get(metric)) for split in self.task.dev_splits}
        panels = {f"dev {metric}": dev, "training loss": {"train": line(lambda e: e["train_loss"])}}
        plot_curves(self.out_dir / "curves.png", panels, xlabel="epoch")


def predictions_record(task: GlueTask, model, data, splits, collator, batch_size: int, mode: str,
                       mc_samples: int, seed: int | None = None) -> dict:
    """{split: {metrics, outputs, labels}} of the model on ``splits`` of ``data``; outputs are logits (mc: log of
    the averaged probabilities of the networks of ``seed``'s streams) or STS-B scores."""
    record = {}
    for split in splits:
        outputs = predict(model, data[split], collator, batch_size, mode, mc_samples, seed)
        labels = np.asarray(data[split]["labels"])
        record[split] = {"metrics": score(task, outputs, labels), "outputs": outputs.tolist(),
                         "labels": labels.tolist()}
    return record


class GlueRecipe(Recipe):
    """One GLUE run: checkpoints in the output directory itself, dev metrics every epoch (or eval_steps),
    results.json rewritten after every evaluation and marked complete once everything is saved."""

    data_first = True
    not_sharded = "a GLUE encoder fits one device (and is quantized in-process)"
    blocks = BLOCKS

    def __init__(self, task: GlueTask, settings: GlueRun):
        tag = f"{settings.method}-{settings.quant}{settings.bits}-r{settings.rank}"
        tag += "" if settings.quantize_embeddings or settings.method == "lora" else "-fpemb"
        settings.output_dir = str(settings.output_dir or Path("runs/glue") / tag / task.name
                                     / f"seed{settings.seed}")
        super().__init__(settings)
        self.task = task

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir

    def derive(self) -> None:
        """The adapted modules as wrap_model sets them, from the model's config on the meta device (no weights), so
        settings.json, a resume and --skip_if_complete compare the same list."""
        config = load_pretrained(AutoConfig, self.settings.model, num_labels=self.task.num_labels)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        check_target_names(model, self.settings.target_modules)  # before the weights load
        self.settings.target_modules = adapted_modules(model, self.settings)

    def load_data(self):
        self.raw = load_glue(self.task, self.settings.get("data_dir"), self.settings.get("train_file"),
                             self.settings.get("validation_file"))

    def training_arguments(self, resume: bool) -> TrainingArguments:
        """TrainingArguments from the settings; checkpoints every save_steps optimizer steps (0: every epoch)."""
        settings, every = self.settings, "steps" if self.settings.eval_steps else "epoch"
        return TrainingArguments(
            **shared_arguments(settings), output_dir=str(self.output_dir), num_train_epochs=settings.num_train_epochs,
            max_steps=settings.max_steps or -1, eval_strategy=every, eval_steps=settings.eval_steps or None,
            logging_strategy=every, logging_steps=settings.eval_steps or 500,
            save_strategy="steps" if settings.save_steps else "epoch", save_steps=settings.save_steps or 500,
            average_tokens_across_devices=False,  # else DDP multiplies the (per-example mean) loss by the world size
        )

    def load_model(self, arguments):
        tokenizer, model = load_model(self.settings.model, self.task, init_dir=bool(self.settings.get("init_dir")))
        return wrap_model(model.to(arguments.device), self.settings), tokenizer  # LoftQ runs on the training device

    def datasets(self, tokenizer):
        self.data = tokenize(self.raw, self.task, tokenizer, self.settings.max_length)
        return self.data["train"], {split: self.data[split] for split in self.task.dev_splits}

    def make_trainer(self, model, tokenizer, arguments, train_set, held_out):
        settings = self.settings
        header = {key: settings[key] for key in ("task", "method", "backbone", "quant", "bits", "rank", "K",
                                                 "llmmscale", "learning_rate", "seed", "eval_noise")}
        if settings.eval_noise == "mc":
            header["mc_samples"] = settings.mc_samples
        header["cell"] = stats.cell_of(settings)  # every setting but the seed: what tables pool seeds by
        self.recorder = ResultsRecorder(self.output_dir, self.task, header)
        trainer = GlueTrainer(
            model=model, args=arguments, train_dataset=train_set, eval_dataset=held_out, processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            # a diverged model scores NaN here; the training step stops the run
            compute_metrics=lambda prediction: score(self.task, prediction.predictions, prediction.label_ids),
            callbacks=[self.recorder], regression=self.task.is_regression,
            mc_samples=settings.mc_samples if settings.eval_noise == "mc" else None, mc_seed=settings.seed)
        self.recorder.evaluated = trainer.evaluated
        return trainer

    def after_training(self, trainer, model, tokenizer) -> None:
        """The width search on the first dev split: nll(m) of the mc prediction as scripts.eval_glue --mode mc computes
        it (the same networks, precision and batches), so eval_glue at the chosen m gives the recorded nll; the chosen
        m is saved in the adapter (the dev metrics recorded during training are at m = 1)."""
        settings = self.settings
        if settings.noise_width_search == "none":
            return
        split = self.task.dev_splits[0]  # whole on every process (DDP too), so that every process finds the same m
        collator = DataCollatorWithPadding(tokenizer)

        def nll(m: float) -> float:
            return predictions_record(self.task, model, self.data, [split], collator,
                                      settings.per_device_eval_batch_size, "mc", settings.mc_samples,
                                      settings.seed)[split]["metrics"]["nll"]

        record = width_search.search_width(model, nll, settings, f"on {split}")
        self.recorder.header.update(noise_width_search={**record, "split": split, "mc_samples": settings.mc_samples,
                                                        "seed": settings.seed}, noise_width=record["chosen"])

    def finish(self, trainer, outcome, model, tokenizer):
        return None

    def save(self, trainer, model, tokenizer, results) -> dict:
        out, task, settings = self.output_dir, self.task, self.settings
        write_json(out / "predictions.json", predictions_record(
            task, trainer.model, self.data, task.dev_splits, DataCollatorWithPadding(tokenizer),
            settings.per_device_eval_batch_size, "mean", settings.mc_samples))
        self.recorder.plot()
        quantized_here = settings.method != "lora" and not settings.get("init_dir")  # Q exists only in this run
        save_run(trainer.model, tokenizer, out, settings.model, quantized_here)
        results = self.recorder.write(trainer.state.log_history, complete=True)  # complete once everything is saved
        if (out / "eval").exists():
            outdirs.remove_stale(out / "eval", "eval_glue scored the adapter before this resume (run it again)")
        best = results["best"]
        cli.logger.info("%s %s: best %s %s at epoch %s; outputs in %s", task.name, settings.method, task.main_metric,
                        best and best["dev"][task.dev_splits[0]][task.main_metric], best and best["epoch"], out)
        return results


def train(argv: list[str] | None = None) -> dict | None:
    """scripts.train_glue: the row of configs/glue.yaml and the flags, then the recipe."""
    return GlueRecipe(*resolve(argv)).run()
