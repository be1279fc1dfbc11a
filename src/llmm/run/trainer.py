"""The Trainer every recipe uses (llmm.run.recipe): ``LlmmTrainer``, an HF Trainer subclass with one noise stream
per process (saved in every checkpoint) and a stop at the first non-finite loss or gradient: such a step is never
applied, nor checkpointed (exit code 3). What a checkpoint holds and a resume checks: llmm.run.checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from llmm import entropy, entropy_weight, noise_source
from llmm.model import ADAPTER_WEIGHTS, adapter_weights, frozen_embedding_bases, unwrapped_name
from llmm.run.checkpoints import (CHECKPOINT_PREFIX, LOSS_SUM, NOISE_STATE, SHARDED_MODEL_PART, checkpoint_is_finite,
                                  checkpoint_loss_sum, complete_checkpoints, full_state_checkpoint,
                                  load_sharded_adapter, trainer_state)
from llmm.run.cli import TrainingDiverged, logger
from llmm.run.fileio import write_json
from llmm.sharding import local_shard
from llmm.tasks.calibration import cpu_4bit_as_plain_peft


def shared_arguments(settings) -> dict:
    """The TrainingArguments every family takes from its settings as they are (its recipe adds the rest)."""
    same = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "learning_rate", "lr_scheduler_type", "weight_decay", "adam_epsilon", "max_grad_norm", "seed",
            "save_total_limit", "report_to")
    return dict(
        **{name: settings[name] for name in same},
        warmup_steps=settings.warmup_ratio,  # a float < 1 is a fraction of the steps
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPU use DDP (gloo)
        ddp_find_unused_parameters=False,  # every trainable tensor is in the graph, K = 0 included
        disable_tqdm=not sys.stderr.isatty(),  # a log file gets the logs as lines, not a redrawn bar (llmm.run.quiet)
    )


def on_any_process(device, *flags) -> list[bool]:
    """Each flag (a bool or a tensor, left on its device until here) true if it is on any process (an all-reduce
    under DDP / FSDP), so every process acts alike; read back once."""
    reduced = torch.stack([torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(()) for flag in flags])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return [bool(flag) for flag in reduced.tolist()]


@contextlib.contextmanager
def training_streams_kept(model):
    """Within: an evaluation may draw from the model's noise generator and the global ones; after: all are where
    training left them, so a run trains the same whatever its evaluation mode and frequency."""
    try:
        source = noise_source(model)
    except ValueError:  # no Llmm layers (a plain model): nothing of ours to keep
        source = None
    noise = source.state_dict() if source is not None else None
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python, numpy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        if source is not None:
            source.load_state_dict(noise)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def outside_training_autocast(model):
    """Within: ``model`` computes without the mixed-precision autocast that accelerate wraps around its forward for
    a bf16 / fp16 Trainer, as a freshly loaded model does (test_mcq, plain PEFT); after: the wrapper is back."""
    original, wrapped = model.__dict__.get("_original_forward"), model.__dict__.get("forward")
    swap = original is not None and wrapped is not None
    if swap:
        model.forward = original
    try:
        yield model
    finally:
        if swap:
            model.forward = wrapped


class PerProcessNoise(TrainerCallback):
    """Seeds each process's noise as training starts, and carries the Llmm noise generator through checkpoints.

    The noise comes from the model's own generator seeded with (seed, process index), so runs of different methods
    with one seed share data order and dropout masks exactly; under DDP the processes' gradients are independent
    samples of E_eps[grad loss]. Dropout's global generator is re-seeded with ``seed + process_index``.
    """

    def __init__(self):
        self.resume_from: str | None = None  # set by LlmmTrainer.train

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        torch.manual_seed(args.seed + args.process_index)
        source = noise_source(model)
        if self.resume_from is None:
            source.seed(args.seed, args.process_index)
            logger.info("process %d draws its noise from seed (%d, %d), dropout from seed %d", args.process_index,
                        args.seed, args.process_index, args.seed + args.process_index)
            return
        path = Path(self.resume_from) / NOISE_STATE.format(args.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is missing, so the Llmm noise cannot continue where it stopped: "
                                    "resume from another checkpoint-N of the run, with the run's number of processes")
        source.load_state_dict(torch.load(path, weights_only=True))
        logger.info("process %d continues its noise from %s", args.process_index, path)

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / NOISE_STATE.format(args.process_index)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(noise_source(model).state_dict(), temporary)
        os.replace(temporary, path)


class StepHooks(TrainerCallback):
    """Stops training before an optimizer step whose loss or gradients are not finite, and after a step that made
    a trainable parameter non-finite (before any checkpoint of it: the Trainer saves after on_step_end); saves the
    run's summed step losses in every checkpoint, so a resumed run's train_loss is the whole run's mean."""

    def __init__(self, trainer: "LlmmTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.stop_if_step_not_finite(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.stop_if_parameters_not_finite(model)

    def on_save(self, args, state, control, **kwargs):
        total = self.trainer.run_loss_sum()  # on every process: the processes' sums are averaged, as the Trainer's
        if total is not None and state.is_world_process_zero:  # None: resumed from a checkpoint without one
            path = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}" / LOSS_SUM
            write_json(path, {"global_step": state.global_step, "loss_sum": total})


class LlmmTrainer(Trainer):
    """The HF Trainer for Llmm models: one noise stream per process, a stop at the first non-finite loss or
    gradient, no training past max_steps on resume, and the optional entropy term.

    The training loss is ``task_loss`` (a family overrides it) minus lambda(step) * llmm.entropy(model, floor) when
    lambda > 0 (``set_entropy_term``); with lambda = 0 the term is never computed (the paper, bit for bit). When it
    is on, each log holds the window's means of ``entropy`` (H, including the floor's constant 0.5 K log(floor) per
    factor: about -6.9 K at Z = 0), ``entropy_weight`` (lambda) and ``task_loss`` (``loss`` is task_loss - lambda H).
    Resuming needs no more: PEFT's load_adapter into the existing "default" adapter keeps its LlmmConfig.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_callback = PerProcessNoise()
        self.add_callback(self.noise_callback)
        self.add_callback(StepHooks(self))
        self.loss_sums = (0.0, 0.0)  # (the steps before this session's, this process's since) summed step losses;
        # the first None: resumed from a checkpoint that did not save it (the run's sum is unknown)
        self.nonfinite_loss = None  # the first non-finite micro-batch loss of the current optimizer step
        self.entropy_settings = (0.0, 0.0, 1e-6)  # (lambda, warm-up ratio, floor): off
        self.entropy_terms = []  # (lambda, H, task loss) of each micro-batch since the last log (no host sync)

    def set_entropy_term(self, weight: float = 0.0, warmup_ratio: float = 0.0, floor: float = 1e-6) -> None:
        """lambda rises linearly to ``weight`` over the first ``warmup_ratio`` of the steps (0: the paper)."""
        self.entropy_settings = (float(weight), float(warmup_ratio), float(floor))

    def entropy_lambda(self) -> float:
        weight, ratio, _ = self.entropy_settings
        warmup = int(-(-ratio * max(self.state.max_steps, 0) // 1))  # ceil
        return entropy_weight(self.state.global_step, weight, warmup)

    def task_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The family's loss (the Trainer's own here): subclasses override this, not ``compute_loss``."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self.task_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.entropy_settings[0] > 0 and model.training):
            return result
        loss, outputs = result if return_outputs else (result, None)
        term, weight = entropy(model, self.entropy_settings[2]), self.entropy_lambda()
        # A loss normalised by num_items_in_batch is this micro-batch's share of the step's: the Trainer does not
        # divide it by the accumulation steps, so the term (added once per micro-batch) must take its share too.
        share = 1 / self.current_gradient_accumulation_steps if self.loss_is_a_share(num_items_in_batch) else 1
        self.entropy_terms.append((weight, term.detach(), loss.detach() / share))
        loss = loss - share * weight * term.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def loss_is_a_share(self, num_items_in_batch) -> bool:
        """Whether the Trainer takes the loss as already divided for gradient accumulation (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's log, with the entropy term's mean since the last log and lambda when the term is on."""
        if self.entropy_terms and "loss" in logs:
            weights, terms, losses = zip(*self.entropy_terms)
            logs["entropy"] = torch.stack([t.float().cpu() for t in terms]).mean().item()
            logs["entropy_weight"] = sum(weights) / len(weights)
            logs["task_loss"] = torch.stack([t.float().cpu() for t in losses]).mean().item()
            self.entropy_terms = []
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; a checkpoint already at max_steps is loaded, not trained further (the Trainer would take
        one more step). A resumed run's training_loss is the whole run's mean step loss (the checkpoint's LOSS_SUM plus
        this session's), as an uninterrupted run's is; the Trainer's covers this session alone."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self.noise_callback.resume_from = resume_from_checkpoint or None
        state = trainer_state(resume_from_checkpoint) if resume_from_checkpoint else None
        # This run's max_steps decides (a longer run continues); epoch-based runs keep the checkpoint's count.
        max_steps = self.args.max_steps if self.args.max_steps > 0 else (state or {}).get("max_steps", 0)
        if state and 0 < max_steps <= state["global_step"]:
            logger.info("%s is at max_steps (%d): no more training, only evaluation and export",
                        resume_from_checkpoint, state["global_step"])
            self.load_final_adapter(resume_from_checkpoint)
            self.state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / "trainer_state.json"))
            before = checkpoint_loss_sum(resume_from_checkpoint, state)
            if before is None:
                logger.warning("train_loss is unknown: %s has no %s (written by llmm since 2026-12-07)",
                               resume_from_checkpoint, LOSS_SUM)
            return TrainOutput(self.state.global_step, None if before is None else before / state["global_step"], {})
        if state and self.is_fsdp_enabled and full_state_checkpoint(resume_from_checkpoint):
            self.load_final_adapter(resume_from_checkpoint)  # before sharding: see _load_from_checkpoint
        before = checkpoint_loss_sum(resume_from_checkpoint, state) if state else 0.0
        self.loss_sums = (before, 0.0)
        outcome = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if not state:
            return outcome
        if before is None:
            logger.warning("train_loss covers steps %d-%d only: %s has no %s (written by llmm since 2026-12-07)",
                           state["global_step"] + 1, outcome.global_step, resume_from_checkpoint, LOSS_SUM)
            return outcome
        whole_run = self.run_loss_sum() / max(outcome.global_step, 1)
        logger.info("train_loss %.4f: the mean of steps 1-%d (the Trainer's %.4f above is of the resumed steps %d-%d)",
                    whole_run, outcome.global_step, outcome.training_loss, state["global_step"] + 1,
                    outcome.global_step)
        return outcome._replace(training_loss=whole_run, metrics={**outcome.metrics, "train_loss": whole_run})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """``Trainer._load_from_checkpoint``, except for an FSDP checkpoint saved with FULL_STATE_DICT (the adapter
        file, no pytorch_model_fsdp_0/): ``train`` loaded its adapter into the model before sharding, where the
        Trainer, handed the FSDP-wrapped model, would look for the whole model's weights."""
        if self.is_fsdp_enabled and full_state_checkpoint(resume_from_checkpoint):
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The Trainer's, then each group's learning rate from this run's schedule at the checkpoint's step: the
        optimizer state holds the one the checkpoint's own schedule gave, another when a resume runs longer."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper, if any
        if checkpoint and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            for group, base, rate in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * rate(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what the log reads

    def load_final_adapter(self, checkpoint: str) -> None:
        """The checkpoint's adapter into the (not yet sharded) model: adapter_model.safetensors through PEFT, or a
        sharded checkpoint's (SHARDED_STATE_DICT: pytorch_model_fsdp_0/, no adapter file) read in each process
        (load_sharded_adapter), as the FSDP engine would restore it."""
        part = Path(checkpoint) / SHARDED_MODEL_PART
        if full_state_checkpoint(checkpoint) or not (part / ".metadata").is_file():
            self.model.load_adapter(checkpoint, adapter_name="default", is_trainable=True)
        else:
            load_sharded_adapter(self.accelerator.unwrap_model(self.model), part)

    def evaluate(self, *args, **kwargs):
        """``Trainer.evaluate`` that leaves the training streams as they were, CPU 4-bit layers computing as in a
        freshly loaded model (as every evaluation does)."""
        model = self.accelerator.unwrap_model(self.model)
        with training_streams_kept(model), cpu_4bit_as_plain_peft(model):
            return super().evaluate(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        """``Trainer._save`` with the adapter's weights selected as the final adapter's are (adapter_weights): PEFT's
        own ``save_pretrained`` finds no adapter tensor under nested FSDP1 units, so its weights file is replaced.
        Neither copies the frozen base weights of adapted embedding / LM-head layers. An empty adapter is a ValueError
        before anything of the checkpoint is written."""
        peft_model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not hasattr(peft_model, "peft_config"):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir or self.args.output_dir
        weights = adapter_weights(peft_model, state_dict)
        frozen = {unwrapped_name(key) for key in frozen_embedding_bases(peft_model) or ()}
        state = peft_model.state_dict() if state_dict is None else state_dict
        with warnings.catch_warnings():  # PEFT's "auto" announces saving them; with this state dict it does not
            warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
            super()._save(output_dir, {key: value for key, value in state.items() if unwrapped_name(key) not in frozen})
        save_file(weights, os.path.join(output_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})

    def save_model(self, output_dir=None, _internal_call=False):
        """``Trainer.save_model``; a SHARDED_STATE_DICT checkpoint holds only the shards, so the main process adds the
        adapter_config.json that resuming checks (before trainer_state.json, which marks a checkpoint complete)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        folder = Path(output_dir or self.args.output_dir)
        if self.is_fsdp_enabled and hasattr(self.model, "peft_config") and self.is_world_process_zero() \
                and not (folder / "adapter_config.json").is_file():
            self.model.peft_config["default"].save_pretrained(str(folder))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One forward/backward; a non-finite loss is remembered and stops training before the optimizer step (no
        stall: the Trainer already waits for every step's loss, ``logging_nan_inf_filter``)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss) and self.nonfinite_loss is None:
            self.nonfinite_loss = loss.item()
        self.loss_sums = (self.loss_sums[0], self.loss_sums[1] + loss.detach().float())  # no host sync
        return loss

    def run_loss_sum(self) -> float | None:
        """The whole run's summed step losses so far (the processes' mean; None: unknown); every process calls it."""
        before, session = self.loss_sums
        if before is None:
            return None
        if isinstance(session, torch.Tensor):
            session = self.accelerator.reduce(session, "mean").item()
        return before + session

    def stop_if_step_not_finite(self, model) -> None:
        """Raise TrainingDiverged, on every process alike, if this step's loss or gradients are not finite. Under
        fp16 mixed precision the grad scaler already skips steps with inf gradients: only the loss is checked."""
        grads = [local_shard(p.grad) for p in model.parameters() if p.requires_grad and p.grad is not None]
        check_grads = grads and self.accelerator.scaler is None
        grads_bad = ~torch.stack([torch.isfinite(g).all() for g in grads]).all() if check_grads else False
        flags = on_any_process(self.args.device, self.nonfinite_loss is not None, grads_bad)
        loss, self.nonfinite_loss = self.nonfinite_loss, None
        if flags[0]:
            self.stop(f"training loss is {loss if loss is not None else 'not finite (on another process)'} at step "
                      f"{self.state.global_step + 1}")
        if flags[1]:
            self.stop(f"gradients are not finite (NaN or inf) at step {self.state.global_step + 1}, the update was "
                      "not applied")

    def stop_if_parameters_not_finite(self, model) -> None:
        """On every process alike: each checks its own shards (FSDP), the flag is reduced over all of them."""
        params = [local_shard(p) for p in model.parameters() if p.requires_grad]
        bad = ~torch.stack([torch.isfinite(p).all() for p in params]).all() if params else False
        if on_any_process(self.args.device, bad)[0]:
            self.stop(f"the update of step {self.state.global_step + 1} made the adapter's parameters non-finite "
                      "(not checkpointed)")

    def stop(self, what: str) -> None:
        """Raise TrainingDiverged naming the last good checkpoint: the newest complete one that reads back finite."""
        self.callback_handler.on_train_end(self.args, self.state, self.control)  # training ends: close the bars
        good = next((path for path in reversed(complete_checkpoints(self.args.output_dir))
                     if checkpoint_is_finite(path)), None)
        kept = f"the last good checkpoint is {str(good)!r}" if good else "no good checkpoint was written yet"
        raise TrainingDiverged(f"{what}; stopped, {kept}: start a new run with a lower --learning_rate or clipped "
                               "gradients (--max_grad_norm); a resume keeps this run's settings")
