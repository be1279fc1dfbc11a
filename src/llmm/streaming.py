"""LoftQ over a safetensors checkpoint, one tensor at a time: ``_init.sh`` in bounded memory, whatever the size.

    model = empty_model(AutoModelForCausalLM, AutoConfig.from_pretrained(folder), checkpoint_dtype(folder, config))
    report = quantize_checkpoint(folder, out_dir, model, modules, config, dtype=torch.bfloat16)

The model is built on the meta device, which decides the targets and the output's layout as loading it would.
Every checkpoint tensor is then read on its own at its offset, cast as ``from_pretrained(dtype="auto")`` would,
LoftQ'd if it is a target (``loftq_matrix``), cast to the storage dtype and written into its place in output
shards laid out beforehand. The adapter file (zero-filled: the directions are zero) is laid out from a meta PEFT
model and each pair of means written as LoftQ returns it. Peak memory is one input tensor plus LoftQ's buffers.

The result equals the whole-model path bit for bit (tests/test_streaming_init.py). Where streaming does not apply
(no safetensors: ``local_checkpoint``; tensors the checkpoint lacks: ``tensor_plan``), the caller
(llmm.run.quantize) uses the whole-model path."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from peft import get_peft_model_state_dict
from safetensors import safe_open
from transformers import GenerationConfig

from llmm.layer import loftq_factors
from llmm.model import get_llmm_model, is_direction_key

logger = logging.getLogger("llmm")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # output shard size bound (the output's layout only: memory never holds a shard)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def checkpoint_index(folder: str | Path) -> dict[str, Path] | None:
    """Tensor name -> the .safetensors file holding it; None when the folder has no safetensors."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        missing = sorted({name for name in weight_map.values() if not (folder / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{str(folder / INDEX_FILE)!r} names shard(s) {missing} that are not in the "
                                    "folder: copy / download them again")
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), "pt") as handle:
            return dict.fromkeys(handle.keys(), folder / SINGLE_FILE)
    return None


def local_checkpoint(name_or_path: str) -> Path | None:
    """A local folder holding the model's safetensors: ``name_or_path`` itself, or a hub id's snapshot (safetensors
    and JSON only); None when there is none or the hub is unreachable."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        try:
            folder = Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
        except (OSError, ValueError) as error:  # offline, unknown repository: the whole-model path reports it
            logger.info("no safetensors snapshot of %r (%s): loading the whole model", name_or_path, error)
            return None
    return folder if checkpoint_index(folder) is not None else None


def checkpoint_dtype(folder: str | Path, model_config) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads in: the config's, else the first floating tensor's."""
    dtype = getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    for key, file in checkpoint_index(folder).items():
        with safe_open(str(file), "pt") as handle:
            found = _torch_dtype(handle.get_slice(key).get_dtype())
        if found.is_floating_point:
            return found
    return torch.float32


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _torch_dtype(code: str) -> torch.dtype:
    for dtype, name in SAFETENSORS_DTYPES.items():
        if name == code:
            return dtype
    raise ValueError(f"unsupported safetensors dtype {code!r}: convert the checkpoint to float/bfloat16")


def empty_model(loader, model_config, dtype: torch.dtype) -> torch.nn.Module:
    """The model ``loader.from_pretrained`` would build, on the meta device (no memory), in ``dtype``."""
    with init_empty_weights():
        model = loader.from_config(copy.deepcopy(model_config), dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied lm_head is the embedding table, not a tensor of its own
    return model


def tensor_plan(folder: str | Path, model: torch.nn.Module) -> tuple[dict[str, str], list[str]]:
    """``(plan, missing)``: checkpoint name -> the name ``save_pretrained`` of ``model`` writes, in file and offset
    order (base-model prefix resolved as from_pretrained does; tied copies and unknown tensors left out), and the
    model's tensors the checkpoint lacks."""
    index = checkpoint_index(folder)
    state = model.state_dict(keep_vars=True)
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept  # tied copies
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else "\0"
    plan, places = {}, _places(index)
    for key in sorted(places, key=lambda key: (str(places[key][0]), places[key][1])):  # each file front to back
        name = (key if key in state else prefix + key if prefix + key in state
                else key.removeprefix(prefix) if key.startswith(prefix) and key.removeprefix(prefix) in state
                else None)
        if name is None or name in aliases:
            continue
        if list(state[name].shape) != list(places[key][4]):
            raise ValueError(f"checkpoint tensor {key!r} has shape {places[key][4]}, the model expects "
                             f"{list(state[name].shape)}: the config.json does not belong to these weights")
        plan[key] = name
    missing = sorted(set(state) - aliases - set(plan.values()))
    return plan, missing


def _places(index: dict[str, Path]) -> dict[str, tuple[Path, int, int, torch.dtype, list[int]]]:
    """Tensor name -> (file, first byte, end byte, dtype, shape), from the files' safetensors headers."""
    places = {}
    for file in dict.fromkeys(index.values()):
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        places.update({key: (file, 8 + size + entry["data_offsets"][0], 8 + size + entry["data_offsets"][1],
                             _torch_dtype(entry["dtype"]), entry["shape"])
                       for key, entry in header.items() if key != "__metadata__" and index.get(key) == file})
    return places


def _read(place: tuple[Path, int, int, torch.dtype, list[int]]) -> torch.Tensor:
    """One tensor, read at its offset into its own memory (not mapped: a mapped file's touched pages stay resident
    while it is open)."""
    file, begin, end, dtype, shape = place
    tensor = torch.empty(shape, dtype=dtype)
    if tensor.numel() * tensor.element_size() != end - begin:
        raise ValueError(f"{str(file)!r}: a tensor's byte range does not match its shape: the file is corrupt")
    view, done = memoryview(tensor.view(-1).view(torch.uint8).numpy()), 0
    with open(file, "rb", buffering=0) as handle:
        handle.seek(begin)
        while done < end - begin:
            count = handle.readinto(view[done:])
            if not count:
                raise ValueError(f"{str(file)!r} ends inside a tensor: it is truncated; copy / download it again")
            done += count
    return tensor


class SafetensorsWriter:
    """A zero-filled .safetensors file laid out from ``layout`` (name -> (dtype, shape)), filled by ``put`` in any
    order; ``close`` checks that every name not in ``zeros`` was put."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, list[int]]], zeros=()):
        self.path, self.layout, self.pending = Path(path), layout, set(layout) - set(zeros)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (dtype, shape) in layout.items():
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.start, self.header = 8 + len(text), header
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        os.write(self.fd, len(text).to_bytes(8, "little") + text)
        os.ftruncate(self.fd, self.start + offset)  # zeros up to the end (POSIX: a file's holes read as zeros)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, laid out as {dtype} {shape}")
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        position, written = self.start + self.header[name]["data_offsets"][0], 0
        while written < data.nbytes:
            written += os.pwrite(self.fd, data[written:], position + written)
        self.pending.discard(name)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        if self.pending:
            raise RuntimeError(f"{self.path.name}: tensors never written: {sorted(self.pending)[:5]}")


def shard_layout(entries: dict[str, tuple[torch.dtype, list[int]]], shard_bytes: int) -> list[dict]:
    """Split the output's tensors (in order) into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards, current, size = [], {}, 0
    for name, (dtype, shape) in entries.items():
        nbytes = _nbytes(dtype, shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = (dtype, shape), size + nbytes
    return shards + [current] if current or not shards else shards


def shard_names(count: int) -> list[str]:
    """transformers' names: model.safetensors, or model-00001-of-0000N.safetensors."""
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def quantize_checkpoint(folder: str | Path, out_dir: str | Path, model: torch.nn.Module, modules: dict,
                        config, dtype: torch.dtype, device: str = "cpu", shard_bytes: int | None = None,
                        final_dir: str | Path | None = None, progress=None) -> dict:
    """Write into ``out_dir`` the backbone (``modules``' weights replaced by LoftQ's Q, all in ``dtype``), its configs
    and ``llmm_init/`` (the means, zero directions). ``model`` is the meta model, ``modules`` its targets (path ->
    module). Returns the per-layer report, as the whole-model path's, in ``modules``' order."""
    folder, out_dir = Path(folder), Path(out_dir)
    index = checkpoint_index(folder)
    plan, missing = tensor_plan(folder, model)
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:3]}: it cannot be streamed (use the whole-model path)")
    state = model.state_dict(keep_vars=True)
    weights = {f"{path}.weight": path for path in modules}
    entries = {name: (dtype if state[name].is_floating_point() else state[name].dtype, list(state[name].shape))
               for name in plan.values()}
    shards = shard_layout(entries, shard_bytes or SHARD_BYTES)
    files = shard_names(len(shards))
    where = {name: file for file, shard in zip(files, shards) for name in shard}
    writers = {file: SafetensorsWriter(out_dir / file, shard) for file, shard in zip(files, shards)}
    adapter, adapter_layout = _adapter_writer(model, config, out_dir / "llmm_init", final_dir or out_dir)
    report, places = {}, _places(index)
    for key, name in (progress or (lambda items: items))(list(plan.items())):
        tensor = _read(places[key])
        if tensor.is_floating_point():
            tensor = tensor.to(state[name].dtype)  # what from_pretrained(dtype="auto") holds
        if name in weights:
            tensor, factor_A, factor_B, report[weights[name]] = loftq_matrix(tensor.to(device), config, dtype)
            _put_means(adapter, adapter_layout, weights[name], factor_A, factor_B)
            del factor_A, factor_B
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writers[where[name]].put(name, tensor)
        del tensor
    for writer in [*writers.values(), adapter]:
        writer.close()
    absent = sorted(set(modules) - set(report))
    if absent:
        raise ValueError(f"target(s) {absent[:3]} have no weight in the checkpoint")
    if len(files) > 1:
        total = sum(_nbytes(d, shape) for d, shape in entries.values())
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": where},
                                                     indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _save_configs(folder, model, dtype, out_dir)
    return {path: report[path] for path in modules}


def loftq_matrix(weight: torch.Tensor, config, dtype: torch.dtype) -> tuple:
    """LoftQ of one weight on its device (both paths of _init.sh): (Q in the storage ``dtype``, M_A and M_B on the
    CPU, the report's entry measured against the stored Q). A 16-bit ``dtype`` quantizes with 16-bit absmax, so the
    stored Q re-quantizes losslessly."""
    weight = weight.to(torch.float32)
    absmax_dtype = dtype if dtype != torch.float32 else None
    scaling = config.lora_alpha / config.r
    started = time.perf_counter()
    q, factor_A, factor_B = loftq_factors(weight, config.r, scaling, config, absmax_dtype=absmax_dtype)
    if weight.is_cuda:
        torch.cuda.synchronize(weight.device)
    seconds = time.perf_counter() - started
    stored = q.to(dtype)
    del q
    residual = weight - stored.float()
    norm = torch.linalg.norm(weight)
    entry = {"shape": list(weight.shape), "svd": config.loftq_svd, "loftq_time_s": seconds,
             "rel_error_q": (torch.linalg.norm(residual) / norm).item(),
             "rel_error_loftq": (torch.linalg.norm(residual - scaling * factor_B @ factor_A) / norm).item()}
    return stored, factor_A.cpu(), factor_B.cpu(), entry


def _adapter_writer(model: torch.nn.Module, config, adapter_dir: Path, final_dir: str | Path):
    """adapter_config.json and the model card written by PEFT from a meta PEFT model, and a tensor file laid out
    from its state dict."""
    skeleton = copy.deepcopy(model)  # meta: a copy costs nothing, and PEFT wraps it in place
    peft_model = get_llmm_model(skeleton, dataclasses.replace(config, init_lora_weights=False, loftq_config={}))
    layout = {key: (value.dtype, list(value.shape)) for key, value in get_peft_model_state_dict(peft_model).items()}
    # Record the LoftQ settings that produced the means, and the backbone they belong to.
    peft_model.peft_config["default"] = dataclasses.replace(config, base_model_name_or_path=str(final_dir))
    peft_model.save_pretrained(adapter_dir, state_dict={})
    zeros = {key for key in layout if is_direction_key(key)}  # the K directions
    unknown = [key for key in set(layout) - zeros if not key.endswith(_MEAN_SUFFIXES)]
    if unknown:
        raise RuntimeError(f"adapter tensor(s) {unknown[:3]} are neither means nor directions")
    return SafetensorsWriter(adapter_dir / "adapter_model.safetensors", layout, zeros=zeros), layout


_MEAN_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def _put_means(writer: SafetensorsWriter, layout: dict, path: str, factor_A, factor_B) -> None:
    """The means of one target in PEFT's layout (an embedding's: A = M_B^T, B = M_A^T), cast as copy_ would."""
    base = f"base_model.model.{path}"
    values = {".lora_A.weight": factor_A, ".lora_B.weight": factor_B,
              ".lora_embedding_A": factor_B.T, ".lora_embedding_B": factor_A.T}
    found = [suffix for suffix in values if base + suffix in layout]
    if len(found) != 2:
        raise RuntimeError(f"no adapter pair for {path!r} in the adapter's layout")
    for suffix in found:
        writer.put(base + suffix, values[suffix].contiguous().to(layout[base + suffix][0]))


def _save_configs(folder: Path, model: torch.nn.Module, dtype: torch.dtype, out_dir: Path) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them."""
    model_config = copy.deepcopy(model.config)
    model_config.dtype = str(dtype).split(".")[1]
    model_config.architectures = [type(model).__name__]
    model_config.save_pretrained(out_dir)
    if model.can_generate():  # from_pretrained's: the checkpoint's generation config, else one from its config.json
        own = (folder / "generation_config.json").is_file()
        options = {} if own else {"config_file_name": "config.json", "_from_model_config": True}
        GenerationConfig.from_pretrained(folder, **options).save_pretrained(out_dir)
