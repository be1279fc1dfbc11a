"""Evaluate trained multiple-choice runs again, or as a deep ensemble: accuracy, ECE, NLL, Brier per mode.

    python -m scripts.test_mcq --runs runs/mcq/obqa-llmm-int8-s1 --eval_modes mean mc --mc_samples 20 --output_dir OUT
    python -m scripts.test_mcq --runs runs/mcq/obqa-map-int8-s{1,2,3} --output_dir runs/mcq/obqa-ensemble-int8

One run: its adapter in every --eval_modes mode (default: the run's); with --noise_width_search tfb | nll | tfb nll
first the width search on the run's validation split, then the evaluations with each rule's m (one search gives both;
TFB's rule needs no training: an llmm run trained with --validation_size N gives the llmm_tfb / llmm_nll rows of the
calibration table, the same numbers as runs that searched after their training; with two rules each one's
reliability plots go to OUTPUT_DIR/<variant>/). Several runs: the deep ensemble, the
average of the members' mean-mode answer distributions (M = the number of runs; they must share every setting but
the seed and data_seed). The eval sets are the run's task test split and its OOD sets (--ood, --test_data and
--max_eval_samples override the run's). Settings come from each run's settings.json (configs/mcq.yaml resolved).
Writes OUTPUT_DIR/results.json and reliability-<set>.png; each evaluation records its seed (an ensemble's: its
members' seeds, "1+2+3"), its cell (the run's settings plus the set, mode and N) for scripts.mcq_table, and every
question's probabilities over its choices with its gold label and id (``questions``: the metrics recompute from them).
results.json's eval_precision says how the evaluation computes (the same in train_mcq: no autocast).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from llmm import outdirs
from llmm.run import cli, fileio, tables
from llmm.tasks.mcq import letter_token_ids
from llmm.run.mcq import TABLE, eval_precision, evaluate_sets, load_all, search_noise_width
from llmm.run.width_search import RULES, apply_noise_width
from llmm.run.mcq_test import parse_args, member_settings, load_member, ensemble_seed, ensemble


def main(argv=None) -> dict:
    started = time.time()
    args = parse_args(argv)
    outdirs.check_outputs_apart({"--output_dir": args.output_dir},
                                {"--runs": args.runs, "--test_data": args.test_data, "--ood": args.ood})
    members = member_settings(args)
    output_dir = Path(args.output_dir)
    outdirs.check_output_dir(output_dir, args.overwrite)
    table = tables.read_yaml(TABLE)
    first = members[0]
    searches = first.searches  # one run: the width rules asked for (member_settings checks)
    _, eval_sets, validation = load_all(first, table, train=bool(searches), with_validation=True)
    outdirs.prepare_output_dir(output_dir, args.overwrite)
    width_search = None
    if len(members) == 1:
        model, tokenizer = load_member(first)
        letters = letter_token_ids(tokenizer, max(len(r["choices"]) for rs, _ in
                                                  [*eval_sets.values(), (validation, None)] for r in rs))
        evaluations = []
        for search in searches or [{}]:  # one search gives every rule's m: then one evaluation per rule
            settings = first.copy(**search)
            if search:
                width_search = width_search or search_noise_width(model, tokenizer, letters, validation, settings)
                apply_noise_width(model, width_search[RULES[search["noise_width_search"]]])
            plots = output_dir / search["variant"] if len(searches) > 1 and search.get("variant") else output_dir
            plots.mkdir(exist_ok=True)
            evaluations += evaluate_sets(model, tokenizer, letters, eval_sets, settings, plots, first.method,
                                         settings.cell)
        method, seed = first.method, first.seed
    else:
        evaluations = ensemble(members, eval_sets, output_dir)
        method, seed = "ensemble", ensemble_seed(members)
    results = {"task": first.task, "method": method, "seed": seed, "member_seeds": [m["seed"] for m in members],
               "K": first.K, "backbone": first.backbone,
               "llmmscale": first.llmmscale, "rank": first.rank, "model": first.model_name_or_path,
               "runs": args.runs, "members": len(members), "eval_precision": eval_precision(first),
               "evaluations": evaluations, "noise_width_search": width_search,
               "wall_time_s": time.time() - started, "versions": fileio.versions(), "complete": True}
    fileio.write_json(output_dir / "results.json", results)
    cli.logger.info("results -> %s", output_dir / "results.json")
    return results


if __name__ == "__main__":
    cli.run_main(lambda: main(sys.argv[1:]))
