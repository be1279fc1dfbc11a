"""A run's checkpoints and its record on disk: which checkpoint-N directories are complete and finite, what a resume
(--resume_from_checkpoint) checks before it continues one, and whether an output directory already holds this run
complete (--skip_if_complete). The Trainer that writes them is llmm.run.trainer's."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file

from llmm import LlmmConfig
from llmm.model import ADAPTER_WEIGHTS, unwrapped_name
from llmm.run import schema
from llmm.run.adapters import read_run_settings
from llmm.run.fileio import check_safetensors, real_path

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
        what = "is not a complete checkpoint (no readable trainer_state.json)" if Path(value).exists() else (
            "does not exist")
        raise FileNotFoundError(f"{value!r} {what}: pass a checkpoint-N directory of the run, or 'latest' (the newest "
                                "complete one)")
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
    command's settings disagree; a setting one side did not record had its field's default there. A variant that only
    names the method is the method's run on either side (schema.without_method_variant)."""
    fields = schema.fields_of(*blocks)
    saved, given = schema.without_method_variant(saved), schema.without_method_variant(given)
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
