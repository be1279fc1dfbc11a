# Sourced by the train_*.sh drivers: how each run is launched. ACCELERATE_CONFIG=FILE (configs/accelerate/*.yaml or
# your own) launches with `accelerate launch --config_file FILE`; else LAUNCH (e.g. "torchrun --nproc_per_node 2");
# else plain python. Both given, or a FILE that does not exist, is one error line (exit 2).
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-}
if [[ -n $ACCELERATE_CONFIG ]]; then
  if [[ -n ${LAUNCH:-} ]]; then echo "error: set LAUNCH or ACCELERATE_CONFIG, not both" >&2; exit 2; fi
  if [[ ! -f $ACCELERATE_CONFIG ]]; then
    echo "error: ACCELERATE_CONFIG $ACCELERATE_CONFIG is not a file: pass one of configs/accelerate/*.yaml" >&2; exit 2
  fi
  LAUNCH="accelerate launch --config_file $ACCELERATE_CONFIG"
fi
LAUNCH=${LAUNCH:-python}

# refuse_loop_flags DRIVER HINT FLAG... -- "$@": a flag the driver's loop sets for each run, given again as an extra
# argument, would win for every run (argparse keeps the last): one error line naming the variable to use (HINT).
refuse_loop_flags() {
  local driver=$1 hint=$2 flags=() arg flag
  shift 2
  while [[ $1 != -- ]]; do flags+=("$1"); shift; done
  shift
  for arg in "$@"; do
    for flag in "${flags[@]}"; do
      if [[ $arg == "$flag" || $arg == "$flag="* ]]; then
        echo "error: $flag is set by $driver for each run (every run would get the same one): use $hint instead" >&2
        exit 2
      fi
    done
  done
}

# choose_model MODEL: what one MODELS entry of the Llama drivers means. A table row sets model_args=(--model ROW),
# a directory (your own checkpoint or _init.sh directory) model_args=(--model_name_or_path DIR) with the table's
# defaults; model_label is what the run directories are named after.
choose_model() {
  model_args=(--model "$1"); model_label=$1
  if [[ -d $1 ]]; then model_args=(--model_name_or_path "$1"); model_label=$(basename "${1%/}"); fi
}

# check_models MODELS: each entry a table row (no "/") or an existing directory, else one error line naming MODELS=
# (the script would look the path up as a row and suggest dropping a --model the user did not type).
check_models() {
  local model
  for model in $1; do
    if [[ $model == */* && ! -d $model ]]; then
      echo "error: MODELS=\"$1\" holds $model, which is not a directory (nor a table row): give an existing directory" \
        "or a row of the table" >&2
      exit 2
    fi
  done
}

# check_seeds SEEDS [table]: each entry a seed (a non-negative integer; with "table", also the word table: the row's
# seed), else one error line naming SEEDS= (argparse would blame --seed, which the user did not type).
check_seeds() {
  local seed
  for seed in $1; do
    if [[ ! $seed =~ ^[0-9]+$ && ! ( $seed == table && ${2:-} == table ) ]]; then
      echo "error: SEEDS=\"$1\" holds $seed, which is not a seed: give non-negative integers${2:+ (or table)}" >&2
      exit 2
    fi
  done
}
