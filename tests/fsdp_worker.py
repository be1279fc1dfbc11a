"""One sharded training step of a tiny Llmm Llama per process (run by tests/test_fsdp.py under torch.distributed.run):
``fsdp1`` (FullyShardedDataParallel with PEFT's wrap policy, flat parameters), ``fsdp2`` (fully_shard per decoder
layer) or ``fsdp2_policy`` (fully_shard also on every module PEFT's policy picks: the LoRA linears and directions). Both processes draw the same noise, so the two-process step equals one process on the global batch."""

import json
import sys

import torch
import torch.distributed as dist
from conftest import LLAMA_TARGETS, tiny_llama
from test_layer import randomize

from llmm import LlmmConfig, get_llmm_model, seed_noise

GLOBAL_BATCH = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(0))


def build(dtype=torch.float32):
    model = get_llmm_model(tiny_llama().to(dtype), LlmmConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, k=2))
    randomize(model)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()  # fp32 adapters over a (possibly) bf16 backbone
    seed_noise(model, 3)
    return model.train()


def two_steps(model, forward_model, inputs) -> list[float]:
    optimizer = torch.optim.SGD([p for p in forward_model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = forward_model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().float())
    return losses


def main(mode: str, dtype: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(getattr(torch, dtype))
    if mode == "fsdp1":
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                           device_id=torch.device("cpu"))
    else:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_auto_wrap_policy(model)
        units = [m for m in model.modules() if mode == "fsdp2_policy" and m is not model
                 and policy(module=m, recurse=False, nonwrapped_numel=0)]  # as accelerate applies FSDP2 with it
        for unit in reversed(units):  # innermost first
            fully_shard(unit)
        for layer in model.base_model.model.model.layers:
            if layer not in units:
                fully_shard(layer)
        wrapped = fully_shard(model)
    rows = GLOBAL_BATCH.shape[0] // world
    losses = two_steps(model, wrapped, GLOBAL_BATCH[rank * rows:(rank + 1) * rows])
    for loss in losses:
        dist.all_reduce(loss)
    sharded = [type(p).__name__ for n, p in model.named_parameters() if "lora_llmm_" in n] if mode != "fsdp1" else []
    if rank == 0:
        result = {"losses": [loss.item() / world for loss in losses], "types": sorted(set(sharded))}
        print("RESULT " + json.dumps(result))
    dist.barrier()  # both processes past every collective before gloo's teardown (else one may abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
