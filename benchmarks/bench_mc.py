"""Monte-Carlo test time: N = 10 sampled networks run sequentially (10 forwards) vs batched (one forward over the
batch repeated 10 times, ``llmm.mc_predict(..., batched=True)``), against one forward of the mean network; and the
training step with per-example noise (``noise_per_example``) against the paper's one draw per forward.

    python -m benchmarks.bench_mc                   # 1 thread, CPU; writes benchmarks/results/mc_cpu.json
    python -m benchmarks.bench_mc --quick           # smaller shapes, for a smoke run
    python -m benchmarks.bench_mc --device cuda     # on a GPU (writes mc_cuda.json), where batching should pay

A Llama of hidden size 512, 2 layers, vocab 4096 (--quick: 128, vocab 512), all seven linear projections adapted
(rank 8, K = 2), a batch of 8 questions x 64 tokens read as five answer letters (``LetterHead``, as in
bench_mcq). Each measurement is the median of --repeats interleaved rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import add_out, record
from llmm import LlmmConfig, get_llmm_model, mc_predict, noise_mode
from llmm.tasks.calibration import LetterHead

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LETTERS = [5, 6, 7, 8, 9]


def build(quick: bool, per_example: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden, vocab = (128, 512) if quick else (512, 4096)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = get_llmm_model(LlamaForCausalLM(config), LlmmConfig(r=8, lora_alpha=16, target_modules=TARGETS, k=2,
                                                                noise_per_example=per_example))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_llmm_" in name:
                parameter.normal_(0, 0.1)
    return model


def timed(functions: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds per function; the functions run interleaved, round after round (a shared machine's load
    then weighs on all of them alike), after one warm-up round."""
    times = {name: [] for name in functions}
    for round_index in range(repeats + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    add_out(parser, "mc_<device>[_quick].json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    model = build(args.quick).to(device).eval()
    vocab = model.config.vocab_size
    head = LetterHead(model, LETTERS).to(device)  # the multiple-choice family's classifier over answer letters
    batch = {"input_ids": torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(8, 64, dtype=torch.long), "n_choices": torch.full((8,), len(LETTERS))}
    batch = {key: value.to(device) for key, value in batch.items()}
    n = args.samples

    def mean():
        with torch.no_grad(), noise_mode(head, "mean"):
            head(**batch).logits.softmax(-1)

    seconds = timed({
        "mean_network": mean,
        "sequential_own_generator": lambda: mc_predict(head, batch, n),
        "sequential": lambda: mc_predict(head, batch, n, seed=0),
        "batched": lambda: mc_predict(head, batch, n, seed=0, batched=True),
    }, args.repeats, device)
    trained = {per_example: build(args.quick, per_example).to(device).train() for per_example in (False, True)}

    def train_step(per_example: bool):
        trained[per_example].zero_grad()
        trained[per_example](input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()

    step = timed({"per_forward": lambda: train_step(False), "per_example": lambda: train_step(True)},
                 args.repeats, device)
    result = {
        "what": f"test time of N = {n} Monte-Carlo networks over answer letters, sequential (the model's own "
                "generator, as today; SeedSequence streams) vs batched, relative to the mean network; training step "
                "with per-example vs per-forward noise",
        "shape": {"hidden": model.config.hidden_size, "layers": 2, "vocab": vocab, "batch": 8, "tokens": 64,
                  "rank": 8, "K": 2, "targets": TARGETS},
        "threads": 1, "repeats": args.repeats, "device": args.device, "platform": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": seconds,
        "ratio_to_mean_network": {key: value / seconds["mean_network"] for key, value in seconds.items()},
        "train_step_seconds": step,
        "per_example_step_ratio": step["per_example"] / step["per_forward"],
    }
    record(result, args.out, f"mc_{device.type}{'_quick' * args.quick}.json")
    return result


if __name__ == "__main__":
    main()
