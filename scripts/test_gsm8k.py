"""Evaluate an Llmm GSM8K adapter: batched generation, answer extraction, exact-match accuracy.

    python -m scripts.test_gsm8k --adapter runs/gsm8k-llama-2-7b/adapter --output_dir runs/gsm8k-llama-2-7b/test
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --decoding reference      # the reference's sampling
    python -m scripts.test_gsm8k --adapter ... --output_dir ... --mode mc --mc_samples 8  # Monte-Carlo vote

The backbone is --model_name_or_path, else the one the adapter was trained on (adapter_config.json). Modes:
mean (default) uses the mean adapter (merged into a 16/32-bit backbone; unmerged over NF4, where merging would
re-quantize W_q + g M_B M_A); sample draws fresh noise at every forward, i.e. every decoded token (the reference;
the noise generator is seeded with (--seed, process index));
mc draws mc_samples networks (one noise draw each for the whole test set) and takes the majority answer. Both
draw the noise m times as wide, m the adapter's noise_width (1 unless train_gsm8k's --noise_width_search chose it).
Left padding, KV cache; several processes (accelerate launch) split the questions. Settings: configs/gsm8k_test.yaml.
Writes OUTPUT_DIR/predictions.jsonl (question, generated, extracted, gold, correct) and results.json (accuracy).
"""

from __future__ import annotations

import sys
import json
import time
from pathlib import Path
from accelerate import PartialState
from accelerate.utils import gather_object
from llmm import outdirs
from llmm.run import cli, fileio
from llmm import stats
from llmm.tasks.prompts import accuracy
from llmm.run.gsm8k_test import parse_settings, check_adapter, load_test_records, load_model, predict


def main(argv=None) -> dict:
    started = time.time()
    settings = parse_settings(argv)
    output_dir = Path(settings.output_dir)
    outdirs.check_outputs_apart({"--output_dir": output_dir},
                                {f"--{key}": settings.get(key) for key in ("adapter", "model_name_or_path", "data")})
    outdirs.check_output_dir(output_dir, settings.overwrite)
    adapter_config = check_adapter(settings)
    records = load_test_records(settings)
    model, tokenizer = load_model(settings)
    state = PartialState()
    with state.split_between_processes(list(range(len(records)))) as mine:
        predictions = predict(model, tokenizer, [records[i] for i in mine], settings)
    predictions = gather_object(list(zip(mine, predictions)))
    predictions = [p for _, p in sorted(predictions, key=lambda pair: pair[0])]
    results = {
        "accuracy": accuracy([p["extracted"] for p in predictions], [p["gold"] for p in predictions]),
        "n": len(predictions), "n_correct": sum(p["correct"] for p in predictions),
        "n_without_number": sum(p["extracted"] is None for p in predictions),
        "mode": settings.mode, "decoding": settings.decoding, "adapter": settings.adapter,
        "noise_width": float(getattr(adapter_config, "noise_width", 1.0)),  # m of the sample / mc modes' noise
        "model": settings.model_name_or_path, "wall_time_s": time.time() - started,
        "settings": settings.record(), "versions": fileio.versions(),
    }
    results["seed"], results["cell"] = stats.test_cell(Path(settings.adapter).parent, settings)  # for tables
    outdirs.make_output_dir(output_dir, settings.overwrite)
    if state.is_main_process:
        fileio.write_text(output_dir / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        fileio.write_json(output_dir / "results.json", results)
        cli.logger.info("GSM8K accuracy %.2f%% (%d / %d) -> %s", 100 * results["accuracy"], results["n_correct"],
                      results["n"], output_dir)
    return results


if __name__ == "__main__":
    cli.run_main(lambda: main(sys.argv[1:]))
