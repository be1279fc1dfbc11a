"""Training pieces every recipe shares (llmm.run.recipe): resume and its checks, one noise stream per process (saved
in every checkpoint), and a stop at the first non-finite loss or gradient (``LlmmTrainer``, an HF Trainer subclass):
such a step is never applied, nor checkpointed (exit code 3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from llmm import LlmmConfig, entropy, entropy_weight, noise_source
from llmm.model import ADAPTER_WEIGHTS, adapter_weights, frozen_embedding_bases, unwrapped_name
from llmm.sharding import local_shard
from llmm.run import schema
from llmm.run.adapters import read_run_settings
from llmm.run.cli import TrainingDiverged, logger
from llmm.run.fileio import check_safetensors, real_path, write_json
from llmm.tasks.calibration import cpu_4bit_as_plain_peft

CHECKPOINT_PREFIX = "checkpoint-"
NOISE_STATE = "llmm_noise_rng_{}.pt"  # one per process, beside the Trainer's rng_state_<process>.pth
LOSS_SUM = "llmm_loss_sum.json"  # the run's summed step losses up to the checkpoint: a resumed run's train_loss


def add_resume_flag(parser: argparse.ArgumentParser) -> None:
    """--resume_from_checkpoint and --skip_if_complete: how a training run starts when its directory holds a run."""
    parser.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue an interrupted run: a checkpoint-N directory, or no value / 'latest' for the "
                             "newest complete one in the output directory (the adapter's M and Z, optimizer, "
                             "scheduler and RNG states are restored)")
    add_skip_flag(parser)


def add_skip_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip_if_complete", action="store_true", default=None,
                        help="if --output_dir holds a complete run with these settings, say so and stop (the drivers' "
                             "rerun); a complete run with other settings is an error, except a larger --max_steps "
                             "with --resume_from_checkpoint: it trains on")


def read_json_or_none(path: Path):
    """A JSON file's content, or None when it is missing, unreadable or malformed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def trainer_state(checkpoint: str | Path) -> dict | None:
    """The checkpoint's trainer_state.json, or None if it is missing, empty, truncated or not the Trainer's."""
    state = read_json_or_none(Path(checkpoint) / "trainer_state.json")
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoint-N directories in ``folder`` that were written to the end (the Trainer writes
    trainer_state.json last: a crash or a full disk leaves it missing or truncated), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.glob(f"{CHECKPOINT_PREFIX}*")
             if path.name[len(CHECKPOINT_PREFIX):].isdigit() and trainer_state(path) is not None]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def checkpoint_loss_sum(checkpoint: str | Path, state: dict) -> float | None:
    """The run's summed step losses up to ``checkpoint`` (its LOSS_SUM, at its trainer state's step), or None."""
    saved = read_json_or_none(Path(checkpoint) / LOSS_SUM)
    fits = isinstance(saved, dict) and saved.get("global_step") == state["global_step"]
    return float(saved["loss_sum"]) if fits and isinstance(saved.get("loss_sum"), (int, float)) else None


def checkpoint_world_size(checkpoint: str | Path) -> int | None:
    """How many processes wrote the checkpoint (rng_state.pth: one; rng_state_<rank>.pth: one each; None: neither)."""
    ranks = len(list(Path(checkpoint).glob("rng_state_*.pth")))
    return ranks or (1 if (Path(checkpoint) / "rng_state.pth").is_file() else None)


def sharded_checkpoint_parts(checkpoint: str | Path) -> list[Path]:
    """The torch.distributed.checkpoint folders of an FSDP checkpoint saved with SHARDED_STATE_DICT (accelerate:
    pytorch_model_fsdp_0/ and optimizer_0/, each with a .metadata file)."""
    return sorted(path for path in Path(checkpoint).glob("*_[0-9]*") if (path / ".metadata").is_file())


def read_sharded_part(folder: Path) -> dict:
    """A torch.distributed.checkpoint folder read whole in this one process (through a temporary torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "whole.pt"
        dcp_to_torch_save(str(folder), str(whole))
        return torch.load(whole, map_location="cpu", weights_only=False)


SHARDED_MODEL_PART = "pytorch_model_fsdp_0"  # accelerate's SHARDED_STATE_DICT model folder (FSDP1 and FSDP2)


def full_state_checkpoint(checkpoint: str | Path) -> bool:
    """The checkpoint holds the adapter's file (one process, DDP, FSDP FULL_STATE_DICT), not SHARDED_STATE_DICT's."""
    return (Path(checkpoint) / ADAPTER_WEIGHTS).is_file()


def load_sharded_adapter(model: torch.nn.Module, part: str | Path) -> list[str]:
    """Copy the model's trainable tensors (M and Z) from a SHARDED_STATE_DICT folder (accelerate: ``{"model": state
    dict}`` in pytorch_model_fsdp_0/) into ``model``, in this process alone, without reading the frozen backbone's
    shards; keys match with the wrappers' segments and the adapter's name dropped. Returns the names loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    adapter = getattr(model, "active_adapter", "default")

    def key(name: str) -> str:  # accelerate's adapter_only save names them as PEFT does, without the adapter's name
        return unwrapped_name(name).replace(f".{adapter}.", ".")

    metadata = dcp.FileSystemReader(str(part)).read_metadata().state_dict_metadata
    saved = {key(name.removeprefix("model.")): name.removeprefix("model.") for name, value in metadata.items()
             if name.startswith("model.") and isinstance(value, TensorStorageMetadata)}
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    names, wanted = {key(name): name for name, _ in trainable}, {key(name): p for name, p in trainable}
    missing = sorted(set(wanted) - set(saved))
    if missing or not wanted:
        raise ValueError(f"{str(part)!r} holds no {missing[:3] or 'trainable tensor'} of this model: resume from a "
                         "checkpoint of this run (same targets, K and rank)")
    state = {saved[name]: torch.empty(tuple(metadata[f"model.{saved[name]}"].size),
                                      dtype=metadata[f"model.{saved[name]}"].properties.dtype) for name in wanted}
    for name, parameter in wanted.items():
        if state[saved[name]].shape != parameter.shape:
            raise ValueError(f"{str(part)!r}: {name} has shape {tuple(state[saved[name]].shape)}, the model "
                             f"expects {tuple(parameter.shape)}: resume with the run's settings")
    dcp.load({"model": state}, checkpoint_id=str(part), no_dist=True)
    with torch.no_grad():
        for name, parameter in wanted.items():
            parameter.copy_(state[saved[name]])
    return sorted(names.values())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors(item)


def checkpoint_is_finite(checkpoint: str | Path) -> bool:
    """Every tensor of the checkpoint's weights (*.safetensors, or the sharded pytorch_model_fsdp_0/) and optimizer
    state (optimizer.pt, or the sharded optimizer_0/) is finite."""
    try:
        states = [load_file(file) for file in Path(checkpoint).glob("*.safetensors")]
        states += [read_sharded_part(folder) for folder in sharded_checkpoint_parts(checkpoint)]
        optimizer = Path(checkpoint) / "optimizer.pt"
        if optimizer.is_file():
            states.append(torch.load(optimizer, map_location="cpu", weights_only=True))
        return all(torch.isfinite(t).all() for t in _tensors(states) if t.is_floating_point())
    except Exception:  # unreadable or truncated: not good either
        return False


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
    if trainer_state(value) is None:
        raise FileNotFoundError(f"{value!r} is not a complete checkpoint (no readable trainer_state.json): pass a "
                                "checkpoint-N directory of the run, or 'latest' (the newest complete one)")
    return value


def checkpoint_adapter_settings(checkpoint: str, saved, settings) -> dict:
    """The settings (of those this run has) that the checkpoint's adapter fixes besides K and rank: lora_alpha,
    llmmscale, noise_per_example and GLUE's embedding protocol (quantize_embeddings, gaussian_embeddings)."""
    fixed = {}
    weights = Path(checkpoint) / ADAPTER_WEIGHTS
    if "quantize_embeddings" in settings and weights.is_file():
        with safe_open(str(weights), "pt") as handle:
            fixed["quantize_embeddings"] = any("lora_embedding_A" in key for key in handle.keys())
    fixed.update(gaussian_embeddings=getattr(saved, "gaussian_embeddings", False), lora_alpha=saved.lora_alpha,
                 llmmscale=saved.scale, noise_per_example=getattr(saved, "noise_per_example", False))
    return {name: value for name, value in fixed.items() if name in settings}


def check_checkpoint(checkpoint: str, settings) -> None:
    """The checkpoint was written by as many processes as this run has, is complete and finite, holds the noise
    generator's state, and its adapter has the settings' K, rank and checkpoint_adapter_settings."""
    saved = LlmmConfig.from_pretrained(checkpoint)
    written_by, processes = checkpoint_world_size(checkpoint), PartialState().num_processes
    if written_by is not None and written_by != processes:
        raise ValueError(f"checkpoint {checkpoint!r} was written by {written_by} process(es), this run has "
                         f"{processes}: resume with {written_by} (e.g. torchrun --nproc_per_node {written_by}); "
                         "each process restores its own noise stream and data shard")
    check_safetensors(checkpoint)
    if not checkpoint_is_finite(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} holds non-finite (NaN or inf) weights or optimizer state: "
                         "resume from an earlier checkpoint-N")
    if (saved.k, saved.r) != (settings["K"], settings["rank"]):
        raise ValueError(f"checkpoint {checkpoint!r} holds an adapter with K={saved.k}, rank={saved.r} but the "
                         f"settings say K={settings['K']}, rank={settings['rank']}: resume with the run's settings "
                         "(its settings.json)")
    for name, value in checkpoint_adapter_settings(checkpoint, saved, settings).items():
        if value != settings[name]:
            raise ValueError(f"checkpoint {checkpoint!r} was trained with {name}={value!r} but the settings say "
                             f"{settings[name]!r}: resume with the run's settings (its settings.json)"
                             + ("" if isinstance(value, bool) else f", e.g. --{name} {value}"))
    step = (trainer_state(checkpoint) or {}).get("global_step", 0)
    if settings.get("max_steps") is not None and step > settings["max_steps"]:  # its schedule ran longer
        raise ValueError(f"checkpoint {checkpoint!r} is at step {step}, past --max_steps {settings['max_steps']}: "
                         f"resume with --max_steps {step} or more, or train a run of {settings['max_steps']} steps "
                         "from the start")
    if not (Path(checkpoint) / NOISE_STATE.format(0)).is_file():
        raise FileNotFoundError(f"{checkpoint!r} has no {NOISE_STATE.format(0)} (the Llmm noise generator's state), so "
                                "the run cannot continue exactly: resume from another checkpoint-N of the run")


# Settings a resumed run may change: how long it trains and how often it evaluates (the rest must be the run's).
RESUMABLE = frozenset({"max_steps", "num_train_epochs", "eval_steps"})


def same_setting(saved, given) -> bool:
    """Equal values, or two spellings of one local path (or list of paths)."""
    if saved == given:
        return True
    if isinstance(saved, list) and isinstance(given, list):
        return len(saved) == len(given) and all(map(same_setting, saved, given))
    if isinstance(saved, str) and isinstance(given, str) and os.path.exists(os.path.expanduser(given)):
        return real_path(saved) == real_path(given)
    return False


def checkpoint_run(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """The run a checkpoint belongs to (the nearer of its two parents that holds settings.json), else ``output_dir``:
    a checkpoint of another run is checked against that run's settings."""
    for folder in list(Path(checkpoint).resolve().parents)[:2]:
        if (folder / "settings.json").is_file():
            return folder
    return Path(output_dir)


def first_difference(saved: dict, given: dict, names, blocks) -> tuple[str, object, object] | None:
    """(name, the run's value, this command's) of the first of ``names`` where the run's settings.json and this
    command's settings disagree; a setting one side did not record had its field's default there."""
    fields = schema.fields_of(*blocks)
    for name in sorted(set(names) & (set(saved) | set(given))):
        if name not in fields and not (name in saved and name in given):
            continue
        value, asked = (side[name] if name in side else fields[name].default for side in (saved, given))
        if not same_setting(value, asked):
            return name, value, asked
    return None


def check_resumable(run_dir: str | Path, settings, blocks) -> None:
    """A resumed run keeps the cell (roles cell and init_dir of ``blocks``), seed and inputs of the run's
    settings.json, except RESUMABLE (first_difference)."""
    given = settings.record() if isinstance(settings, schema.Settings) else settings
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        return
    saved = read_run_settings(path, blocks, "the run's settings are unknown, so it cannot be resumed safely; start a "
                              "new run in another --output_dir")
    fixed = (schema.role_names(schema.CELL, blocks) | schema.role_names(schema.INIT_DIR, blocks) | {"seed"}
             | set(schema.input_names())) - schema.role_names(schema.EVAL, blocks) - RESUMABLE
    difference = first_difference(saved, given, fixed, blocks)
    if difference:
        name, value, asked = difference
        flag = f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"  # as a flag takes it
        if name in ("init_dir", "base_model") and saved.get("model"):  # the row's: --model brings it back
            flag = f"--model {saved['model']} without --model_name_or_path"
        if value is None:
            raise ValueError(f"--resume_from_checkpoint: the run in {str(run_dir)!r} was trained without {name}, this "
                             f"command says {asked!r}: drop --{name}, or start a new run in another --output_dir")
        raise ValueError(f"--resume_from_checkpoint: the run in {str(run_dir)!r} was trained with {name}={value!r}, "
                         f"this command says {asked!r}: resume with the run's settings (its "
                         f"settings.json, e.g. {flag}), or start a new run in another --output_dir")


def is_complete(run_dir: str | Path) -> bool:
    """The run finished: its results.json is readable and not marked incomplete (GLUE writes one every epoch)."""
    results = read_json_or_none(Path(run_dir) / "results.json")
    return isinstance(results, dict) and results.get("complete", True) is True


def check_same_run(run_dir: str | Path, settings, blocks, saved: dict | None = None) -> bool:
    """Whether a complete run is what this command would run: its settings (``saved``, else its settings.json) agree
    on every setting that changes a number (all but the run plumbing, seed and inputs included). False: they differ
    only in max_steps and this command resumes, so the run trains on to it (a lower one: check_checkpoint's error);
    any other difference, epochs included (a complete epoch-based run does not train on), is one error line naming
    the first."""
    if saved is None:
        saved = read_run_settings(Path(run_dir) / "settings.json", blocks, "remove the run to train it again, or "
                                  "choose another --output_dir")
    compared = (set(schema.fields_of(*blocks)) - schema.role_names(schema.RUN, blocks)) | {"seed"} | set(
        schema.input_names(blocks))
    resuming = bool(settings.get("resume_from_checkpoint"))
    difference = first_difference(saved, settings.record(), compared - ({"max_steps"} if resuming else set()), blocks)
    if difference:
        name, value, asked = difference
        further = f", continue it to {name}={asked!r} with --resume_from_checkpoint" * (name == "max_steps")
        raise ValueError(f"{str(run_dir)!r} is a complete run made with {name}={value!r}, this command says "
                         f"{asked!r}: run these settings in another --output_dir (a driver: another OUT= or RUNS=)"
                         f"{further}, or remove that run to run it again")
    return first_difference(saved, settings.record(), {"max_steps"}, blocks) is None


def done_already(run_dir: str | Path, settings, blocks, settings_in_results: bool = False) -> bool:
    """--skip_if_complete: True (said once, by the main process) when ``run_dir`` holds a complete run of these
    settings (check_same_run: one of other settings is an error; a resume to more max_steps trains on), else False.
    ``settings_in_results``: the run's settings are its results.json's (test_gsm8k), not a settings.json."""
    if not settings.get("skip_if_complete") or not is_complete(run_dir):
        return False
    saved = read_json_or_none(Path(run_dir) / "results.json").get("settings", {}) if settings_in_results else None
    if not check_same_run(run_dir, settings, blocks, saved):
        return False
    if PartialState().is_main_process:
        print(f"done already: {run_dir}")
    return True


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
