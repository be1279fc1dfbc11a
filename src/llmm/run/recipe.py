"""The run skeleton every task family uses: the flow of a training run written once, with hooks for what a family
adds (its data, its model and adapter, its Trainer, its results and files).

    class GlueRecipe(Recipe):
        def load_data(self): ...            # raw data, checked before anything is written
        def load_model(self, arguments): ... # (model with its adapter, tokenizer)
        def datasets(self, tokenizer): ...   # (train, held-out) for the Trainer
        def make_trainer(self, ...): ...     # the LlmmTrainer (subclass) with the family's metrics and callbacks
        def finish(self, trainer, outcome): ...  # results (written to results.json), the family's files

    results = GlueRecipe(settings).run()

Every check (the launch's sharding, the data, the checkpoint resumed from against settings.json, the output
directory apart from every input) comes before the output directory is created, so bad input writes nothing.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from llmm import outdirs, sharding
from llmm.model import atomic_dir, export_mean_adapter, save_llmm_adapter
from llmm.run import checkpoints, fileio, schema
from llmm.run.cli import logger


class Recipe:
    """One training run of a task family (subclass and fill the hooks)."""

    def __init__(self, settings: schema.Settings):
        self.settings = settings
        self.output_dir = Path(settings.output_dir)
        self.started = time.time()
        self.sharding = "none"  # what the launch shards with (run: check_sharded_launch)
        self.adapter_state = None  # under sharding: the gathered adapter tensors (pass as state_dict when saving)

    # --- hooks ---------------------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Where the Trainer writes checkpoint-N/ (and where --resume_from_checkpoint looks)."""
        return self.output_dir / "checkpoints"

    def derive(self) -> None:
        """First of all: settings the run derives from its model that settings.json records (GLUE's adapted modules),
        so that a resume and --skip_if_complete compare them with the saved run's."""

    def load_data(self) -> None:
        """Read and check the data (before anything is written)."""

    def training_arguments(self, resume: bool):
        raise NotImplementedError

    def load_model(self, arguments):
        """(model with its adapter, tokenizer)."""
        raise NotImplementedError

    def datasets(self, tokenizer) -> tuple:
        """(train, held-out) datasets for the Trainer."""
        raise NotImplementedError

    def make_trainer(self, model, tokenizer, arguments, train_set, held_out):
        raise NotImplementedError

    def after_training(self, trainer, model, tokenizer) -> None:
        """After training, on every process: a step on the trained model (e.g. a search on the validation split)."""

    def finish(self, trainer, outcome, model, tokenizer) -> dict:
        """After training, on every process: the results (the main process then writes them to results.json)."""
        raise NotImplementedError

    def save(self, trainer, model, tokenizer, results: dict) -> dict:
        """On the main process: the adapters, results.json and the family's files; returns the final results."""
        return results

    blocks = schema.BLOCKS  # the family's settings (llmm.run.schema.FAMILY_BLOCKS): what a resume must keep

    def inputs(self) -> dict:
        """{flag: path or paths} of what the run reads, with the checkpoint resumed from unless it is this run's own."""
        found = {f"--{name}": self.settings[name] for name in schema.input_names(self.blocks)
                 if self.settings.get(name)}
        checkpoint = getattr(self, "resumed_from", None)
        if checkpoint and outdirs.resolved(self.output_dir) not in outdirs.resolved(checkpoint).parents:
            found["--resume_from_checkpoint"] = checkpoint
        return found

    def check_output(self, resume: bool) -> None:
        """The output directory is none of the inputs, holds none and lies in none, and may become this run's (new,
        empty, resumed or an llmm one replaced with --overwrite)."""
        outdirs.check_outputs_apart({"--output_dir": str(self.output_dir)}, self.inputs())
        if not resume and (self.output_dir / "quantize_report.json").is_file():  # other runs may train on it
            raise FileExistsError(f"{str(self.output_dir)!r} is an _init.sh directory (quantize_report.json): a "
                                  "training run never replaces one: choose another --output_dir")
        outdirs.check_output_dir(self.output_dir, self.settings.get("overwrite", False), resume=resume)

    # --- the flow ------------------------------------------------------------------------------------------------

    not_sharded: str | None = None  # why an accelerate FSDP / DeepSpeed launch is refused (None: it is not)
    data_first = False  # read the data before the checkpoint and output-directory checks (GLUE) or after them

    def done_already(self) -> bool:
        """--skip_if_complete: the output directory holds this run, complete (a complete run of other settings is an
        error naming the first that differs)."""
        if self.data_first:
            self.load_data()
        self.derive()
        return checkpoints.done_already(self.output_dir, self.settings, self.blocks)

    def run(self) -> dict | None:
        """The results, or None when --skip_if_complete found this run complete already."""
        settings = self.settings
        if self.not_sharded and sharding.requested_engine() != "none":
            raise ValueError(f"{self.not_sharded}, so it is not trained under {sharding.requested_engine()}: launch "
                             "with DDP (torchrun, or an accelerate config without FSDP / DeepSpeed)")
        if self.done_already():
            return None
        self.sharding = sharding.check_sharded_launch()
        checkpoint = checkpoints.find_checkpoint(settings.get("resume_from_checkpoint"), self.checkpoint_dir)
        self.resumed_from = checkpoint
        if checkpoint:
            checkpoints.check_checkpoint(checkpoint, settings)
            run = checkpoints.checkpoint_run(checkpoint, self.output_dir)  # its own run, or the run it came from
            checkpoints.check_resumable(run, settings, self.blocks)  # before settings.json is rewritten
        self.check_output(resume=checkpoint is not None)
        if not self.data_first:
            self.load_data()
        arguments = self.training_arguments(resume=checkpoint is not None)
        fileio.seed_everything(settings.seed)
        model, tokenizer = self.load_model(arguments)
        train_set, held_out = self.datasets(tokenizer)
        outdirs.make_output_dir(self.output_dir, settings.get("overwrite", False), resume=checkpoint is not None)
        if checkpoint and (self.output_dir / "results.json").is_file():  # a finished run trained further is not
            (self.output_dir / "results.json").unlink()  # complete until this run writes its own results
        trainer = self.make_trainer(model, tokenizer, arguments, train_set, held_out)
        trainer.set_entropy_term(settings.entropy_weight, settings.entropy_warmup_ratio,
                                 settings.entropy_floor)  # lambda = 0 (the paper): off
        if trainer.is_world_process_zero():
            fileio.write_json(self.output_dir / "settings.json",
                              {**fileio.real_inputs(settings.record(), self.blocks), "resumed_from": checkpoint,
                               "versions": fileio.versions()})
            held = sum(map(len, held_out.values())) if isinstance(held_out, dict) else len(held_out or ())
            logger.info("training on %d examples, evaluating on %d; every setting in %s", len(train_set), held,
                        self.output_dir / "settings.json")
            if checkpoint:  # said after the model's load, whose fresh task head the checkpoint replaces
                logger.info("resuming from %s: its trained weights, optimizer, scheduler and random states replace "
                            "the freshly initialised ones", checkpoint)
        outcome = trainer.train(resume_from_checkpoint=checkpoint)
        self.after_training(trainer, model, tokenizer)
        if self.sharding == "FSDP":  # a collective: every process takes part, the main process saves the result
            self.adapter_state = sharding.gathered_state_dict(trainer.model_wrapped)
        elif self.sharding == "DEEPSPEED":  # ZeRO-3: the 16-bit consolidated state (zero3_save_16bit_model), as the
            self.adapter_state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # Trainer saves it
        results = self.finish(trainer, outcome, model, tokenizer)
        if trainer.is_world_process_zero():
            results = self.save(trainer, model, tokenizer, results)
        return results


def save_run(model, tokenizer, output_dir: Path, base: str, quantized_here: bool, state_dict=None) -> None:
    """adapter/ (M and Z), mean_adapter/ (plain PEFT LoRA) and, when this run quantized the backbone, backbone/ (Q,
    which both adapters name, resolved, as base_model_name_or_path), each written atomically. The backbone is
    written last: unloading the adapters is what gives it back. ``state_dict``: a sharded run's gathered tensors."""
    backbone = (output_dir / "backbone").resolve() if quantized_here else fileio.real_path(base)
    model.peft_config["default"].base_model_name_or_path = str(backbone)
    with warnings.catch_warnings():  # PEFT looks for the base's config.json, which backbone/ gets just after
        warnings.filterwarnings("ignore", message="Could not find a config file in")
        save_llmm_adapter(model, str(output_dir / "adapter"), overwrite=True, state_dict=state_dict)
        export_mean_adapter(model, str(output_dir / "mean_adapter"), overwrite=True, state_dict=state_dict)
    if quantized_here:
        with atomic_dir(str(backbone), overwrite=True) as tmp_dir:
            model.unload().save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
