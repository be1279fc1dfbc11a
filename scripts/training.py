"""Training pieces shared by scripts.train_glue and scripts.causal_lm: resume, one noise stream per process (saved in
every checkpoint), and a stop at the first non-finite loss (``LlmmTrainer``, an HF Trainer subclass)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from llmm import noise_source
from utils_llmm import TrainingDiverged, logger

CHECKPOINT_PREFIX = "checkpoint-"
NOISE_STATE = "llmm_noise_rng_{}.pt"  # one per process, beside the Trainer's rng_state_<process>.pth


def add_resume_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue an interrupted run: a checkpoint-N directory, or no value / 'latest' for the "
                             "newest complete one in the output directory (the adapter's M and Z, optimizer, "
                             "scheduler and RNG states are restored)")


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint-N directories in ``folder`` that were written to the end, oldest first.

    The Trainer writes trainer_state.json last, so a checkpoint cut short by a crash lacks it and is skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*")
             if path.name[len(CHECKPOINT_PREFIX):].isdigit() and (path / "trainer_state.json").is_file()]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(value: str | None, folder: str | Path) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names: None, a checkpoint directory, or 'latest' (the newest
    complete checkpoint-N in ``folder``, the run's checkpoint directory)."""
    if value is None:
        return None
    if value == "latest":
        done = complete_checkpoints(folder)
        if not done:
            raise FileNotFoundError(f"no complete checkpoint-N in {str(folder)!r} to resume from: drop "
                                    "--resume_from_checkpoint to start afresh, or pass a checkpoint directory")
        return str(done[-1])
    if not (Path(value) / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{value!r} is not a complete checkpoint (no trainer_state.json): pass a "
                                "checkpoint-N directory of the run, or 'latest'")
    return value


def check_checkpoint(checkpoint: str, settings: dict) -> None:
    """The checkpoint's adapter has the settings' K and rank (else its M and Z cannot be restored), and the noise
    generator's state is there."""
    from llmm import LlmmConfig

    saved = LlmmConfig.from_pretrained(checkpoint)
    if (saved.k, saved.r) != (settings["K"], settings["rank"]):
        raise ValueError(f"checkpoint {checkpoint!r} holds an adapter with K={saved.k}, rank={saved.r} but the "
                         f"settings say K={settings['K']}, rank={settings['rank']}: resume with the run's settings "
                         "(its settings.json)")
    if not (Path(checkpoint) / NOISE_STATE.format(0)).is_file():
        raise FileNotFoundError(f"{checkpoint!r} has no {NOISE_STATE.format(0)} (the Llmm noise generator's state), so "
                                "the run cannot continue exactly: resume from another checkpoint-N of the run")


class PerProcessNoise(TrainerCallback):
    """Seeds each process's noise as training starts, and carries the Llmm noise generator through checkpoints.

    The Llmm noise eps comes from the model's own generator (``llmm.noise_source``), seeded with (seed, process
    index): it consumes no number of torch's global stream, so runs of different methods with one seed share data
    order and dropout masks exactly. Torch's global generator (dropout) is re-seeded with ``seed + process_index``.
    Under DDP independent draws per process make the processes' gradients independent samples of
    E_eps[grad loss] (a shared seed would repeat one sample N times). Each checkpoint gets the generator's state
    beside the Trainer's rng_state files (``llmm_noise_rng_<process>.pt``); on resume it is restored from there.
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


class LlmmTrainer(Trainer):
    """The HF Trainer for Llmm models: one noise stream per process, and a stop at the first non-finite loss.

    Resuming needs nothing more: for a PeftModel the Trainer loads a checkpoint with
    ``model.load_adapter(checkpoint, "default", is_trainable=True)``; the adapter "default" already exists, so
    PEFT keeps its LlmmConfig (the layers stay Llmm layers) and ``set_peft_model_state_dict`` restores every M and
    Z; the optimizer, scheduler and RNG states come from the same checkpoint (tests/test_resume.py checks that a
    resumed run reproduces the uninterrupted run's losses bit for bit).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_callback = PerProcessNoise()
        self.add_callback(self.noise_callback)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's train; tells the noise callback which checkpoint (if any) to restore the noise from."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self.noise_callback.resume_from = checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One forward/backward; a NaN or infinite loss stops training before the optimizer applies it, so no
        checkpoint with a broken adapter is written and the last good one is kept. The check adds no stall: the
        Trainer already waits for every step's loss (``logging_nan_inf_filter``)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            message = self.divergence_message(loss.item())
            self.callback_handler.on_train_end(self.args, self.state, self.control)  # training ends: close the bars
            raise TrainingDiverged(message)
        return loss

    def divergence_message(self, loss: float) -> str:
        done = complete_checkpoints(self.args.output_dir)
        kept = f"the last good checkpoint is {str(done[-1])!r}" if done else "no checkpoint was written yet"
        return (f"training loss is {loss} at step {self.state.global_step + 1}; stopped, {kept}: lower "
                "--learning_rate or clip gradients (--max_grad_norm), then start again or --resume_from_checkpoint")
