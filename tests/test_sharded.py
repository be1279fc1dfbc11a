"""Sharded training of Llmm models on CPU: FSDP2 (fully_shard) and FSDP1 over gloo with 2 processes (llmm.sharding).

The 2-process runs (marked slow) start this file as a worker under ``torch.distributed.run``: a tiny Llama, K = 2,
AdamW, a global batch of 4 sequences split over the processes, each process with its own noise stream (seed,
rank) as under DDP. The reference is one process that runs the two halves as two micro-batches, each with the
noise stream of the process it stands for, and averages their gradients: the same computation in another order
of nothing but the two-term gradient sum, so per-step losses and trained tensors must be equal bit for bit
(a/2 + b/2 == (a + b)/2 exactly in binary floating point).

accelerate 1.15 shards only on accelerator backends: on CPU ``accelerate launch --config_file
configs/accelerate/fsdp2.yaml`` runs DDP, so the HF-Trainer path is checked for a clear refusal, and the engines are
driven directly here (what the Trainer does on GPUs: fully_shard per decoder layer, then the root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the worker runs this file as a script
from conftest import LLAMA_TARGETS, REPO_ROOT, tiny_llama  # noqa: E402

from llmm.run.schema import CausalLMRun
from llmm import LlmmConfig, export_mean_adapter, get_llmm_model, load_llmm_model, noise_source  # noqa: E402
from llmm import save_llmm_adapter  # noqa: E402
from llmm import sharding  # noqa: E402
from llmm.model import keep_cpu_4bit_trainable  # noqa: E402

SEED, STEPS, ROWS = 17, 3, 2  # rows per process and step
CONFIGS = REPO_ROOT / "configs" / "accelerate"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def llmm_config() -> LlmmConfig:
    return LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2, scale=4.0)


def eval_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1000))


def batch(step: int, rank: int) -> torch.Tensor:
    ids = torch.randint(0, 128, (2 * ROWS, 8), generator=torch.Generator().manual_seed(step))
    return ids[rank * ROWS:(rank + 1) * ROWS]


def backbone(dtype: str, model_dir: str | None):
    """The tiny Llama in float32 / bfloat16, or NF4 from ``model_dir`` with bf16 storage (FSDP-QLoRA's setting)."""
    if dtype != "nf4":
        return tiny_llama(0).to(getattr(torch, dtype))
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map={"": "cpu"})


# --- the worker (one process of a run) -----------------------------------------------------------------------------

def checkpoint(model, optimizer, folder: Path, step: int, rank: int, noise_states) -> None:
    """A sharded checkpoint (torch.distributed.checkpoint: each process writes its shards), the noise state(s),
    and last, from the main process, latest.json naming it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = folder / f"step-{step}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(target))
    torch.save(noise_states, target / f"noise_{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (folder / "latest.tmp").write_text(json.dumps({"step": step}))
        os.replace(folder / "latest.tmp", folder / "latest.json")


def restore(model, optimizer, folder: Path, rank: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    step = json.loads((folder / "latest.json").read_text())["step"]
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder / f"step-{step}"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return step, torch.load(folder / f"step-{step}" / f"noise_{rank}.pt", weights_only=True)


def trainer_checkpoint(peft_model, model, folder: Path) -> None:
    """The model part of a checkpoint as LlmmTrainer writes it under FSDP with FULL_STATE_DICT: the state dict
    gathered to the main process (accelerate's get_state_dict: rank0_only; without its offload to CPU, which on CPU
    frees the tensors it reads), handed to LlmmTrainer._save with the wrapped model as the Trainer's model."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import TrainingArguments

    from llmm.run.trainer import LlmmTrainer

    args = TrainingArguments(output_dir=str(folder.parent / "trainer"), use_cpu=True, report_to="none",
                             save_strategy="no")
    trainer = LlmmTrainer(model=peft_model, args=args)
    trainer.model = trainer.model_wrapped = model  # as the Trainer holds a sharded model
    context = FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)) \
        if isinstance(model, FSDP) else contextlib.nullcontext()
    with context:
        state = model.state_dict()
    trainer._save(str(folder), state_dict=state)


def worker(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "nf4"), default="float32")
    parser.add_argument("--shard", choices=("fsdp2", "fsdp1", "none"), default="fsdp2")
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--kill_at", type=int, default=None, help="SIGKILL itself as this step begins")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--guard", action="store_true", help="check the divergence guard on sharded gradients")
    parser.add_argument("--keep_gathered", action="store_true", help="FSDP2 reshard_after_forward=False")
    parser.add_argument("--trainer_save", action="store_true", help="also save through LlmmTrainer (FULL_STATE_DICT)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    base = backbone(args.dtype, args.model_dir)
    torch.manual_seed(SEED)  # the LoRA init of A
    model = get_llmm_model(base, llmm_config())
    keep_cpu_4bit_trainable(model)
    peft_model = model
    if args.shard == "fsdp2":
        sharding.shard_fsdp2(model, reshard_after_forward=not args.keep_gathered)
    elif args.shard == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        model = FSDP(model, auto_wrap_policy=sharding.fsdp1_wrap_policy(model), use_orig_params=False,
                     device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    noise = noise_source(peft_model)
    ranks = [rank] if distributed else [0, 1]  # one process stands for both: their micro-batches and noise streams
    states = {}
    for r in ranks:
        noise.seed(SEED, r)
        states[r] = noise.state_dict()
    start = 0
    if args.resume:
        start, states = restore(model, optimizer, out / "checkpoints", rank)
    model.train()
    for step in range(start, args.steps):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        losses = {}
        for r in ranks:
            noise.load_state_dict(states[r])
            ids = batch(step, r)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / len(ranks)).backward()
            states[r] = noise.state_dict()
            losses[r] = loss.item()
        if args.guard:
            guard(model, rank, out)
            return
        optimizer.step()
        optimizer.zero_grad()
        with open(out / f"losses_{rank}.jsonl", "a") as file:
            file.write(json.dumps({"step": step, "losses": losses}) + "\n")
        checkpoint(model, optimizer, out / "checkpoints", step + 1, rank, states)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=eval_ids()).logits
    if args.trainer_save:
        trainer_checkpoint(peft_model, model, out / "trainer_checkpoint")
    state = sharding.gathered_state_dict(model)
    if rank == 0:
        save_llmm_adapter(peft_model, str(out / "adapter"), state_dict=state)
        export_mean_adapter(peft_model, str(out / "mean_adapter"), state_dict=state)
        torch.save(logits, out / "logits.pt")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def guard(model, rank: int, out: Path) -> None:
    """LlmmTrainer's checks before and after an optimizer step, on FSDP2's sharded gradients and parameters: a NaN
    in process 1's shard only must stop both processes."""
    from types import SimpleNamespace

    from llmm.run.trainer import LlmmTrainer
    from llmm.run.cli import TrainingDiverged

    if rank == 1:
        grad = next(p.grad for p in model.parameters() if p.requires_grad and p.grad is not None)
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
    trainer = SimpleNamespace(nonfinite_loss=None, accelerator=SimpleNamespace(scaler=None),
                              args=SimpleNamespace(device=torch.device("cpu")), state=SimpleNamespace(global_step=0),
                              stop=lambda what: (_ for _ in ()).throw(TrainingDiverged(what)))
    for check, name in ((LlmmTrainer.stop_if_step_not_finite, "guard"),
                        (LlmmTrainer.stop_if_parameters_not_finite, "guard_params")):
        if name == "guard_params" and rank == 1:  # then a NaN in process 1's shard of a parameter
            param = next(p for p in model.parameters() if p.requires_grad)
            with torch.no_grad():
                (param.to_local() if hasattr(param, "to_local") else param).view(-1)[0] = float("nan")
        try:
            check(trainer, model)
            outcome = "went on"
        except TrainingDiverged as error:
            outcome = f"stopped: {error}"
        (out / f"{name}_{rank}.txt").write_text(outcome)


# --- helpers of the tests ------------------------------------------------------------------------------------------

def run(*args, processes: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    return subprocess.run([*launcher, str(Path(__file__).resolve()), *map(str, args)], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def losses(out: Path) -> dict[tuple[int, int], float]:
    """{(step, rank): loss} over every process's file."""
    found = {}
    for file in out.glob("losses_*.jsonl"):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            found.update({(record["step"], int(r)): value for r, value in record["losses"].items()})
    return found


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def assert_same_adapters(a: Path, b: Path) -> None:
    for name in ("adapter", "mean_adapter"):
        left, right = adapter_tensors(a / name), adapter_tensors(b / name)
        assert left.keys() == right.keys()
        different = [key for key in left if not torch.equal(left[key], right[key])]
        assert not different, different[:5]
    assert any("lora_llmm_A" in key for key in adapter_tensors(a / "adapter"))


def final_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    """The trainable (adapter) tensors of the run's newest sharded checkpoint, whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = out / "checkpoints"
    step = json.loads((folder / "latest.json").read_text())["step"]
    dcp_to_torch_save(folder / f"step-{step}", out / "final.pt")
    model = torch.load(out / "final.pt", weights_only=False)["model"]
    return {key: value for key, value in model.items() if ".lora_" in key}


def assert_same_checkpoints(a: Path, b: Path) -> None:
    left, right = final_checkpoint(a), final_checkpoint(b)
    assert left.keys() == right.keys() and any("lora_llmm_B" in key for key in left)
    assert all(torch.equal(left[key], right[key]) for key in left)


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(path)
    return path


# --- tests without processes ---------------------------------------------------------------------------------------

def test_accelerate_configs_parse_and_say_their_command():
    """Each config is YAML accelerate reads, opens with the command that runs it, and has FSDP-QLoRA's settings."""
    configs = {path.stem: path for path in CONFIGS.glob("*.yaml")}
    assert {"fsdp2", "fsdp1", "deepspeed_zero3"} <= configs.keys()
    for path in configs.values():
        text = path.read_text()
        assert text.startswith("#") and "accelerate launch --config_file configs/accelerate/" + path.name in text
        assert yaml.safe_load(text)["num_processes"] == 2
    fsdp2 = yaml.safe_load(configs["fsdp2"].read_text())["fsdp_config"]
    assert fsdp2["fsdp_version"] == 2 and fsdp2["fsdp_cpu_ram_efficient_loading"] is True
    fsdp1 = yaml.safe_load(configs["fsdp1"].read_text())["fsdp_config"]
    assert fsdp1["fsdp_use_orig_params"] is False and fsdp1["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp1["fsdp_sync_module_states"] is True
    zero3 = yaml.safe_load(configs["deepspeed_zero3"].read_text())["deepspeed_config"]
    assert zero3["zero_stage"] == 3 and zero3["zero3_init_flag"] is True


def test_an_empty_adapter_is_never_saved_and_a_checkpoint_holds_the_final_adapter_tensors(tmp_path):
    """LlmmTrainer's checkpoint save and save_llmm_adapter / export_mean_adapter refuse a state dict in which no
    tensor belongs to the adapter (what PEFT alone selects under nested FSDP1 units) with one ValueError, before
    anything is written; from the model's own state a checkpoint holds the tensors save_llmm_adapter writes."""
    from transformers import TrainingArguments

    from llmm.run.trainer import LlmmTrainer

    model = get_llmm_model(tiny_llama(0), llmm_config())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no")
    trainer = LlmmTrainer(model=model, args=args)
    frozen = {key: value for key, value in model.state_dict().items() if ".lora_" not in key}
    for save in (lambda out: trainer._save(out, state_dict=frozen),
                 lambda out: save_llmm_adapter(model, out, state_dict=frozen),
                 lambda out: export_mean_adapter(model, out, state_dict=frozen)):
        with pytest.raises(ValueError, match="the adapter to save would be empty: no tensor of the "):
            save(str(tmp_path / "empty"))
        assert not (tmp_path / "empty").exists()
    trainer._save(str(tmp_path / "checkpoint"))
    save_llmm_adapter(model, str(tmp_path / "adapter"))
    got, expected = adapter_tensors(tmp_path / "checkpoint"), adapter_tensors(tmp_path / "adapter")
    assert got.keys() == expected.keys() and any("lora_llmm_B" in key for key in got)
    assert all(torch.equal(got[key], expected[key]) for key in got)
    assert (tmp_path / "checkpoint" / "adapter_config.json").is_file()


def test_fsdp1_policy_wraps_llmm_layers_and_their_bases_not_the_factors():
    """Each whole Llmm layer (all its own parameters trainable) and its frozen base layer are units, where PEFT's
    policy wraps lora_A / lora_B alone."""
    from peft.utils.other import fsdp_auto_wrap_policy

    model = get_llmm_model(tiny_llama(0), llmm_config())
    ours, peft_policy = sharding.fsdp1_wrap_policy(model), fsdp_auto_wrap_policy(model)
    attention = model.base_model.model.model.layers[0].self_attn
    wraps = {name: ours(module=module, recurse=False, nonwrapped_numel=0) for name, module in (
        ("decoder", model.base_model.model.model.layers[0]), ("llmm", attention.q_proj),
        ("base", attention.q_proj.base_layer), ("lora_A", attention.q_proj.lora_A["default"]),
        ("lora_llmm_A", attention.q_proj.lora_llmm_A), ("embedding", model.base_model.model.model.embed_tokens))}
    assert wraps == {"decoder": True, "llmm": True, "base": True, "lora_A": False, "lora_llmm_A": False,
                     "embedding": False}
    assert peft_policy(module=attention.q_proj.lora_A["default"], recurse=False, nonwrapped_numel=0)
    assert not peft_policy(module=attention.q_proj.lora_llmm_A, recurse=False, nonwrapped_numel=0)
    with pytest.raises(ValueError, match="Llmm layers"):
        sharding.fsdp1_wrap_policy(tiny_llama(0))


def test_check_sharded_launch_refuses_a_config_accelerate_would_not_shard(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert sharding.check_sharded_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)) == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for FSDP but accelerate runs MULTI_CPU"):
        sharding.check_sharded_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, device="cpu"))
    assert sharding.check_sharded_launch(SimpleNamespace(distributed_type=DistributedType.FSDP)) == "FSDP"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="asks for FSDP but accelerate runs"):
            sharding.check_sharded_launch()  # this machine's PartialState: CPU
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="DeepSpeed, which is not installed: pip install deepspeed"):
            sharding.check_sharded_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def gsm8k_argv(model, out, *extra) -> list[str]:
    return ["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(model),
            "--data", str(REPO_ROOT / "tests/data/gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "2",
            "--dtype", "float32", "--max_steps", "1", "--output_dir", str(out), *extra]


def test_run_layer_under_a_sharded_launch_refuses_in_process_loftq_and_stores_nf4_in_the_compute_dtype(
        monkeypatch, tmp_path):
    """Under accelerate's FSDP variables: in-process LoftQ is one error before anything is written; the NF4 backbone
    is stored in the compute dtype (auto) and loaded without a device_map; prepare_model_for_kbit_training (float32
    upcast) is skipped; gradient checkpointing's use_reentrant is the setting's. Without them: uint8, as before."""
    from test_llama_scripts import save_tiny_llama

    from llmm.run import causal_lm
    from scripts import train_gsm8k

    model = save_tiny_llama(tmp_path / "llama")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="in-process LoftQ is not supported under FSDP.*_init.sh"):
        train_gsm8k.main(gsm8k_argv(model, tmp_path / "run", "--init", "loftq", "--load_in_4bit", "false"))
    assert not (tmp_path / "run").exists()

    settings = CausalLMRun.of({"dtype": "bfloat16", "load_in_4bit": True, "model_name_or_path": str(model),
                               "bnb_4bit_quant_storage": "auto", "gradient_checkpointing": True,
                               "gradient_checkpointing_reentrant": True, "prepare_kbit_training": True,
                               "init": "lora"})
    assert causal_lm.quant_storage(settings) == "bfloat16"
    assert causal_lm.quant_storage(settings.copy(bnb_4bit_quant_storage="float32")) == "float32"
    backbone4, _ = causal_lm.load_backbone(settings)
    packed = backbone4.model.layers[0].self_attn.q_proj.weight
    assert packed.dtype == torch.bfloat16 and packed.quant_state is not None
    prepared = causal_lm.prepare_for_training(backbone4, settings)
    assert prepared.model.norm.weight.dtype == torch.bfloat16  # not upcast to float32
    assert causal_lm.checkpointing_kwargs(settings) == {"use_reentrant": True}
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert causal_lm.quant_storage(settings) == "uint8"
    plain, _ = causal_lm.load_backbone(settings)
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert causal_lm.prepare_for_training(plain, settings).model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("family, says", [("glue", "GLUE encoder fits one device"),
                                          ("mcq", "evaluations run on the main process alone")])
def test_glue_and_multiple_choice_recipes_refuse_a_sharded_launch(monkeypatch, tmp_path, family, says):
    """GLUE (encoders that fit one device, quantized in-process) and the multiple-choice family (its evaluations run
    on the main process, which a sharded model would leave waiting) say so in one error before anything is read."""
    from llmm.run.glue import GlueRecipe
    from llmm.run.mcq import McqRecipe

    cls = {"glue": GlueRecipe, "mcq": McqRecipe}[family]
    recipe = cls.__new__(cls)
    recipe.settings, recipe.output_dir = {"output_dir": str(tmp_path / "run")}, tmp_path / "run"
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=f"{says}.*not trained under DEEPSPEED: launch with DDP"):
        recipe.run()
    assert not (tmp_path / "run").exists()


def test_an_fsdp1_launch_meets_the_same_checks_as_fsdp2(monkeypatch, tmp_path):
    """FSDP1 saves its adapters (test_fsdp1_saved_adapter_holds_the_tensors), so its launch is not refused for being
    FSDP1: on this CPU machine it stops where an FSDP2 launch does, before anything is written."""
    from llmm.run.recipe import Recipe

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for version in ("1", "2"):
        monkeypatch.setenv("FSDP_VERSION", version)
        recipe = Recipe(CausalLMRun.of({"output_dir": str(tmp_path / "run")}))
        if torch.cuda.is_available():
            pytest.skip("a GPU machine shards: the run would go on")
        with pytest.raises(ValueError, match="asks for FSDP but accelerate runs"):
            recipe.run()
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")  # FSDP1's sharded parts hold no adapter tensor
    with pytest.raises(ValueError, match="FSDP1 with fsdp_state_dict_type SHARDED_STATE_DICT: .*FULL_STATE_DICT"):
        Recipe(CausalLMRun.of({"output_dir": str(tmp_path / "run")})).run()
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2's parts hold it (load_sharded_adapter)
    with pytest.raises(ValueError, match="asks for FSDP but accelerate runs"):
        Recipe(CausalLMRun.of({"output_dir": str(tmp_path / "run")})).run()
    fsdp1 = (REPO_ROOT / "configs" / "accelerate" / "fsdp1.yaml").read_text()
    assert "fsdp_state_dict_type: FULL_STATE_DICT" in fsdp1 and "  fsdp_version: 1" in fsdp1


def test_sharded_checkpoint_layout_passes_the_resume_checks(tmp_path):
    """An FSDP SHARDED_STATE_DICT checkpoint (pytorch_model_fsdp_0/ and optimizer_0/ of torch.distributed.checkpoint,
    no adapter_model.safetensors, no optimizer.pt) is read for the finiteness check: a NaN in the optimizer's shards
    is found."""
    import torch.distributed.checkpoint as dcp

    from llmm.run.checkpoints import checkpoint_is_finite, sharded_checkpoint_parts

    for name, bad in (("good", False), ("bad", True)):
        folder = tmp_path / name
        moment = torch.ones(4, 3)
        if bad:
            moment[1, 2] = float("nan")
        dcp.save({"model": {"lora_A.weight": torch.ones(2, 3)}}, checkpoint_id=str(folder / "pytorch_model_fsdp_0"))
        dcp.save({"optimizer": {"state": {"0": {"exp_avg": moment}}}}, checkpoint_id=str(folder / "optimizer_0"))
        assert [path.name for path in sharded_checkpoint_parts(folder)] == ["optimizer_0", "pytorch_model_fsdp_0"]
        assert checkpoint_is_finite(folder) is not bad


def save_sharded_part(model, part: Path, extra: dict | None = None) -> None:
    """What accelerate writes as a SHARDED_STATE_DICT checkpoint's pytorch_model_fsdp_0/ ({"model": state dict},
    torch.distributed.checkpoint), here from one process: the trainable tensors and a frozen one."""
    import torch.distributed.checkpoint as dcp

    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state["base_model.model.model.norm.weight"] = torch.full((32,), 7.0)
    dcp.save({"model": {**state, **(extra or {})}}, checkpoint_id=str(part))


def test_load_sharded_adapter_reads_the_trainable_tensors_of_a_sharded_checkpoint(tmp_path):
    """load_sharded_adapter copies every trainable tensor (M and Z) from pytorch_model_fsdp_0/ into a fresh model,
    leaves the frozen ones, matches keys with wrapper segments dropped, and refuses a checkpoint of another K."""
    from llmm.run.checkpoints import load_sharded_adapter

    trained = get_llmm_model(tiny_llama(0), llmm_config())
    with torch.no_grad():
        for parameter in trained.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    save_sharded_part(trained, tmp_path / "ckpt" / "pytorch_model_fsdp_0")
    fresh = get_llmm_model(tiny_llama(0), llmm_config())
    norm = fresh.base_model.model.model.norm.weight.detach().clone()
    loaded = load_sharded_adapter(fresh, tmp_path / "ckpt" / "pytorch_model_fsdp_0")
    assert any("lora_llmm_B" in name for name in loaded)
    ours, theirs = dict(fresh.named_parameters()), dict(trained.named_parameters())
    assert all(torch.equal(ours[name], theirs[name]) for name in loaded)
    assert torch.equal(fresh.base_model.model.model.norm.weight, norm)
    # keys written through wrappers (FSDP1 units, activation checkpointing) still match
    wrapped = {name.replace("self_attn.", "self_attn._checkpoint_wrapped_module."): p
               for name, p in trained.named_parameters() if p.requires_grad}
    import torch.distributed.checkpoint as dcp
    dcp.save({"model": {k: v.detach().clone() for k, v in wrapped.items()}}, checkpoint_id=str(tmp_path / "w"))
    again = get_llmm_model(tiny_llama(0), llmm_config())
    load_sharded_adapter(again, tmp_path / "w")
    assert all(torch.equal(dict(again.named_parameters())[name], theirs[name]) for name in loaded)
    from peft import get_peft_model_state_dict  # what accelerate writes for the Trainer (adapter_only): PEFT's names

    dcp.save({"model": {k: v.detach().clone() for k, v in get_peft_model_state_dict(trained).items()}},
             checkpoint_id=str(tmp_path / "accelerate"))
    third = get_llmm_model(tiny_llama(0), llmm_config())
    assert sorted(load_sharded_adapter(third, tmp_path / "accelerate")) == sorted(loaded)
    assert all(torch.equal(dict(third.named_parameters())[name], theirs[name]) for name in loaded)
    other_k = get_llmm_model(tiny_llama(0), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=3))
    with pytest.raises(ValueError, match="lora_llmm_A.* has shape .*resume with the run's settings"):
        load_sharded_adapter(other_k, tmp_path / "ckpt" / "pytorch_model_fsdp_0")


def test_resume_of_a_sharded_checkpoint_at_max_steps_only_evaluates_and_exports(tmp_path):
    """A checkpoint at max_steps with the SHARDED_STATE_DICT layout (pytorch_model_fsdp_0/, no
    adapter_model.safetensors) is loaded without an FSDP engine: the resumed run trains no step and exports the
    checkpoint's adapter, equal to the one the run saved."""
    import shutil

    from test_llama_scripts import save_tiny_llama

    from llmm.run.checkpoints import SHARDED_MODEL_PART
    from scripts import train_gsm8k

    model, out = save_tiny_llama(tmp_path / "llama"), tmp_path / "run"
    argv = gsm8k_argv(model, out, "--init", "lora", "--load_in_4bit", "false", "--max_steps", "2",
                      "--save_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1")
    train_gsm8k.main(argv)
    shutil.copytree(out / "adapter", tmp_path / "first_adapter")
    checkpoint = out / "checkpoints" / "checkpoint-2"
    trained = load_llmm_model(tiny_llama_from(model), str(checkpoint), is_trainable=True)
    save_sharded_part(trained, checkpoint / SHARDED_MODEL_PART)
    (checkpoint / "adapter_model.safetensors").unlink()
    train_gsm8k.main([*argv, "--resume_from_checkpoint"])
    first, resumed = adapter_tensors(tmp_path / "first_adapter"), adapter_tensors(out / "adapter")
    assert first.keys() == resumed.keys() and any("lora_llmm_B" in key for key in first)
    assert all(torch.equal(first[key], resumed[key]) for key in first)
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from"] == str(checkpoint)


def tiny_llama_from(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_adapters_saved_from_the_gathered_state_equal_the_model_own(tmp_path):
    """save_run with a gathered state dict (what a sharded run's main process passes) writes the same adapter/ and
    mean_adapter/ tensors as from the model itself."""
    from safetensors.torch import load_file

    from llmm.run.causal_lm import save_run

    model = get_llmm_model(tiny_llama(0), llmm_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    save_run(model, None, tmp_path / "own", "tiny", False)
    save_run(model, None, tmp_path / "gathered", "tiny", False, state_dict=sharding.gathered_state_dict(model))
    for folder, directions in (("adapter", True), ("mean_adapter", False)):
        own = load_file(tmp_path / "own" / folder / "adapter_model.safetensors")
        gathered = load_file(tmp_path / "gathered" / folder / "adapter_model.safetensors")
        assert own.keys() == gathered.keys() and own and all(torch.equal(own[k], gathered[k]) for k in own)
        assert any("lora_llmm_B" in key for key in own) is directions  # the mean adapter: plain LoRA keys only


@pytest.mark.parametrize("driver", ["train_gsm8k.sh", "train_nlg_llama.sh", "train_mcq.sh", "train_glue_llmm.sh"])
def test_drivers_launch_through_an_accelerate_config(driver, tmp_path):
    """ACCELERATE_CONFIG=FILE makes a driver start every run with accelerate launch --config_file FILE (a stand-in
    accelerate on PATH records its arguments); with LAUNCH too, or a missing file, it is one error line, exit 2."""
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls.txt\n')
    fake.chmod(0o755)
    path = os.pathsep.join([str(fake.parent), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**ENV, "PATH": path, "OUT": str(tmp_path / "runs"),
           "SEEDS": "0", "MODELS": "llama-2-7b", "TASKS": "alpaca", "QUANTS": "normal_float", "RANKS": "32"}
    config = "configs/accelerate/fsdp2.yaml"
    done = subprocess.run(["bash", driver], cwd=REPO_ROOT, env={**env, "ACCELERATE_CONFIG": config},
                          capture_output=True, text=True, timeout=60)
    # (the seed table the driver prints afterwards finds no results here: its exit code is not the point)
    assert (tmp_path / "calls.txt").is_file(), done.stderr[-2000:]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls and all(call.startswith(f"launch --config_file {config} -m scripts.train_") for call in calls)
    for bad, says in (({"ACCELERATE_CONFIG": config, "LAUNCH": "python"}, "set LAUNCH or ACCELERATE_CONFIG, not both"),
                      ({"ACCELERATE_CONFIG": "configs/accelerate/nope.yaml"}, "is not a file")):
        done = subprocess.run(["bash", driver], cwd=REPO_ROOT, env={**env, **bad}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and says in done.stderr


# --- two processes -------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype,shard", [("float32", "fsdp2"), ("bfloat16", "fsdp2"), ("nf4", "fsdp2"),
                                         ("float32", "fsdp1"), ("bfloat16", "fsdp1")])
def test_two_process_run_equals_one_process_bit_for_bit(dtype, shard, nf4_dir, tmp_path):
    """Per-step losses of both processes, the trained adapter (M and Z) and the mean adapter equal the one-process
    run with the same global batch and noise streams, bit for bit; the adapter gathered from the shards reloads in
    one process to the sharded model's eval logits, and the mean adapter loads in plain PEFT to the same logits."""
    from peft import PeftModel

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    extra = ["--dtype", dtype, "--model_dir", nf4_dir]
    done = run(*extra, "--shard", "none", "--out", single, processes=1)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(*extra, "--shard", shard, "--out", sharded)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = losses(single), losses(sharded)
    assert len(expected) == 2 * STEPS and got == expected
    assert_same_checkpoints(single, sharded)
    assert_same_adapters(single, sharded)
    logits = torch.load(sharded / "logits.pt")
    reloaded = load_llmm_model(backbone(dtype, nf4_dir), str(sharded / "adapter")).eval()
    plain = PeftModel.from_pretrained(backbone(dtype, nf4_dir), str(sharded / "mean_adapter")).eval()
    for model in (reloaded, plain):
        keep_cpu_4bit_trainable(model)  # bitsandbytes' CPU kernel of the training layout, as in the run
        with torch.no_grad():
            assert torch.equal(model(input_ids=eval_ids()).logits, logits)


@pytest.mark.slow
def test_fsdp1_saved_adapter_holds_the_tensors(tmp_path):
    """Under nested FSDP1 units PEFT 0.21 alone selects no adapter tensor (it strips only a leading
    '_fsdp_wrapped_module.'); llmm.model.adapter_state_dict keys the gathered state as PEFT names the modules, so the
    FSDP1-saved adapter and mean adapter equal the single-process ones."""
    assert run("--shard", "none", "--steps", 1, "--out", tmp_path / "single", processes=1).returncode == 0
    assert run("--shard", "fsdp1", "--steps", 1, "--out", tmp_path / "sharded").returncode == 0
    assert_same_adapters(tmp_path / "single", tmp_path / "sharded")


@pytest.mark.slow
def test_fsdp1_full_state_dict_checkpoint_of_the_trainer_holds_the_adapter(tmp_path):
    """LlmmTrainer's checkpoint save under FSDP1 with FULL_STATE_DICT (the gathered state dict handed to ``_save``):
    PEFT's save_pretrained alone writes an empty adapter there; the checkpoint's adapter holds every tensor of the
    single-process run's, equal, and loads back (as resuming does) to the model's eval logits."""
    from llmm.run.checkpoints import full_state_checkpoint

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    done = run("--shard", "none", "--steps", 1, "--trainer_save", "--out", single, processes=1)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("--shard", "fsdp1", "--steps", 1, "--trainer_save", "--out", sharded)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = sharded / "trainer_checkpoint"
    assert full_state_checkpoint(checkpoint) and (checkpoint / "adapter_config.json").is_file()
    got, expected = adapter_tensors(checkpoint), adapter_tensors(single / "adapter")
    assert got.keys() == expected.keys() and any("lora_llmm_A" in key for key in got)
    assert all(torch.equal(got[key], expected[key]) for key in got)
    assert adapter_tensors(single / "trainer_checkpoint").keys() == got.keys()
    reloaded = load_llmm_model(backbone("float32", None), str(checkpoint)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=eval_ids()).logits, torch.load(sharded / "logits.pt"))


@pytest.mark.slow
def test_kill_9_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """FSDP2, float32: killed with SIGKILL as step 2 (0-based) begins, after the sharded checkpoints of steps 1 and
    2; resumed from the newest: the losses of the last step and the final adapters equal the uninterrupted run's."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run("--steps", 3, "--out", whole).returncode == 0
    interrupted = run("--steps", 3, "--kill_at", 2, "--out", killed)
    assert interrupted.returncode != 0
    assert json.loads((killed / "checkpoints" / "latest.json").read_text()) == {"step": 2}
    assert not (killed / "adapter").exists()
    resumed = run("--steps", 3, "--resume", "--out", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(killed) == losses(whole)
    assert_same_adapters(whole, killed)


@pytest.mark.slow
def test_divergence_guard_sees_a_nan_in_another_process_shard(tmp_path):
    """FSDP2 leaves each process only its shard of every gradient and parameter: a NaN in process 1's shard stops
    both (the check before the optimizer step, and the one after it)."""
    done = run("--guard", "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"guard_{rank}.txt").read_text().startswith("stopped: gradients are not finite")
        assert (tmp_path / f"guard_params_{rank}.txt").read_text().startswith("stopped: the update of step 1 made")


@pytest.mark.slow
def test_accelerate_fsdp_config_on_cpu_is_one_clear_error(tmp_path):
    from test_llama_scripts import save_tiny_llama

    model = save_tiny_llama(tmp_path / "llama")
    done = subprocess.run([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml"),
        "--num_processes", "2", "-m", "scripts.train_gsm8k", "--model", "llama-2-7b", "--rank", "64",
        "--model_name_or_path", str(model), "--init", "lora", "--data", str(REPO_ROOT / "tests/data/gsm8k.jsonl"),
        "--eval_split", "heldout", "--eval_size", "2", "--load_in_4bit", "false", "--dtype", "float32",
        "--max_steps", "1", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--output_dir", str(tmp_path / "run")], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    # Each process exits 2 with the error line; accelerate's launcher (torch elastic) reports the failure as 1.
    assert done.returncode != 0 and "error: the accelerate config asks for FSDP but accelerate runs" in done.stderr
    assert "Traceback" not in done.stderr.split("error: the accelerate config")[0]
    assert "exitcode  : 2" in done.stderr
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    worker()
