#!/usr/bin/env bash
# Run the thesis's experiment chain for several models and/or losses, and collect one row per run in a workbook:
#
#   train (cbir-train) -> index (cbir-index) -> train-index (cbir-train-index) -> eval (cbir-eval, per protocol)
#   -> python -m cbir.cli.results append (cbir-results)  (row of sheet "runs" in $WORKBOOK)
#
# Settings come from environment variables, or from VAR=value arguments (they win):
#
#   MODELS="effnet densenet" LOSSES="margin softmax" EPOCHS=3 DATA=../shared/data/histo-bench \
#       bash scripts/run_experiments.sh
#   bash scripts/run_experiments.sh RUNS="effnet:frozen effnet:margin resnet:margin" DATA=... EPOCHS=5
#
#   DATA          data set root holding train/ index/ query/ (or give TRAIN_DATA, INDEX_DATA, QUERY_DATA)
#   MODELS        extractors (default: effnet)            LOSSES  losses (default: margin); every model x loss runs
#   RUNS          "model:loss ..." pairs instead of the cross product. Loss "frozen": no training, the frozen
#                 ImageNet backbone's pooled features (--num_features 0); loss "own": train without --loss
#                 (autoencoders, vae, byol use their own objective)
#   EPOCHS (5)  BATCH_SIZE (32)  LR (1e-4)  NUM_FEATURES (128)  SEED (0)  IMAGES_PER_CLASS  SCHEDULER  FREEZE=1
#   SCRATCH=1 (no ImageNet weights)  VAL_FRACTION (share of train held out for the best-epoch choice)
#   INPUT_SIZE    train at this input size (e.g. 128 on a laptop; the checkpoint keeps it for index and eval)
#   MAX_BATCHES   stop each epoch after this many batches (quick CPU checks)
#   GPU_ID        passed as --gpu_id to every command (a GPU is used when there is one in any case)
#   NUM_WORKERS   image-decoding workers
#   PROTOCOLS     cbir-eval measures (default: "random all weighted separated")
#   TRAIN_INDEX=0 keep the exact index (default 1: cbir-train-index; NLIST, NPROBE tune it)
#   WORKBOOK      (excel_results/results.xlsx; separated's per-class rows go to a sheet named after the run)
#   OUT_DIR       per-run checkpoints, eval JSON files and logs (default: experiments)
#   TAG           suffix of run names, e.g. TAG=lr1e-3;  DB_PREFIX database name prefix (default: exp_)
#   TRAIN_ARGS, INDEX_ARGS, EVAL_ARGS   any further flags of those commands (split on spaces)
#   KEEP_GOING=0  stop at the first failed run (default: go on with the others, exit 1 at the end)
#
# Databases live where the commands put them ($CBIR_HOME, default ./cbir_data); each run rewrites its own.
set -euo pipefail

for assignment in "$@"; do
    case "$assignment" in
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        [A-Z_]*=*) export "${assignment?}" ;;
        *) echo "error: arguments are VAR=value settings (see --help), got '$assignment'" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.venv/bin"
tool() {  # the console script from the project's .venv, else from PATH
    if [ -x "$bin/$1" ]; then echo "$bin/$1"; elif command -v "$1" >/dev/null; then command -v "$1"; else
        echo "error: $1 not found in $bin nor on PATH; run scripts/setup_env.sh" >&2; return 2; fi
}
python="$bin/python"
[ -x "$python" ] || python="$(command -v python3)"
TRAIN="$(tool cbir-train)"; INDEX="$(tool cbir-index)"; TRAIN_IDX="$(tool cbir-train-index)"; EVAL="$(tool cbir-eval)"

DATA="${DATA:-}"
TRAIN_DATA="${TRAIN_DATA:-${DATA:+$DATA/train}}"
INDEX_DATA="${INDEX_DATA:-${DATA:+$DATA/index}}"
QUERY_DATA="${QUERY_DATA:-${DATA:+$DATA/query}}"
MODELS="${MODELS:-effnet}"
LOSSES="${LOSSES:-margin}"
RUNS="${RUNS:-}"
EPOCHS="${EPOCHS:-5}"
BATCH_SIZE="${BATCH_SIZE:-32}"
LR="${LR:-1e-4}"
NUM_FEATURES="${NUM_FEATURES:-128}"
SEED="${SEED:-0}"
PROTOCOLS="${PROTOCOLS:-random all weighted separated}"
TRAIN_INDEX="${TRAIN_INDEX:-1}"
WORKBOOK="${WORKBOOK:-excel_results/results.xlsx}"
OUT_DIR="${OUT_DIR:-experiments}"
DB_PREFIX="${DB_PREFIX:-exp_}"
KEEP_GOING="${KEEP_GOING:-1}"

for split in TRAIN_DATA INDEX_DATA QUERY_DATA; do
    folder="${!split}"
    if [ -z "$folder" ]; then
        echo "error: set DATA=root (with train/ index/ query/) or $split" >&2; exit 2
    fi
    if [ ! -d "$folder" ]; then
        echo "error: $split folder '$folder' does not exist" >&2; exit 2
    fi
done
if [ -z "$RUNS" ]; then
    for model in $MODELS; do for loss in $LOSSES; do RUNS="$RUNS $model:$loss"; done; done
fi

# Flags every command shares.
common=()
[ -n "${GPU_ID:-}" ] && common+=(--gpu_id "$GPU_ID")
[ -n "${NUM_WORKERS:-}" ] && common+=(--num_workers "$NUM_WORKERS")
# Recorded with each row. nvidia-smi answers in a blink where importing torch to ask would take seconds.
device=cpu
if command -v nvidia-smi >/dev/null 2>&1 \
    && gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader -i "${GPU_ID:-0}" 2>/dev/null | head -n 1)" \
    && [ -n "$gpu" ]; then
    device="cuda:${GPU_ID:-0} $gpu"
fi

seconds_since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

run_one() {  # model loss
    local model="$1" loss="$2"
    local name="${model}_${loss}"
    local frozen=0
    if [ "$loss" = frozen ]; then frozen=1; else name="${name}_${NUM_FEATURES}f_${EPOCHS}e"; fi
    [ -n "${TAG:-}" ] && name="${name}_${TAG}"
    name="$(echo "$name" | tr -c 'A-Za-z0-9._\n-' '_')"
    local dir="$OUT_DIR/$name" db="${DB_PREFIX}${name}"
    mkdir -p "$dir"
    local log="$dir/log.txt"
    : > "$log"
    echo "=== $name ($(date '+%F %T'), $device) -> $dir"

    local extractor=() start train_s=0 index_s train_index_s=0
    if [ "$frozen" = 1 ]; then
        extractor=(--extractor "$model" --num_features 0)
    else
        local train=("$TRAIN" --training_data "$TRAIN_DATA" --weights "$dir/extractor.pt" --model "$model"
                     --num_features "$NUM_FEATURES" --num_epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR"
                     --seed "$SEED" "${common[@]}")
        [ "$loss" != own ] && train+=(--loss "$loss")
        [ -n "${INPUT_SIZE:-}" ] && train+=(--input_size "$INPUT_SIZE")
        [ -n "${MAX_BATCHES:-}" ] && train+=(--max_batches "$MAX_BATCHES")
        [ -n "${IMAGES_PER_CLASS:-}" ] && train+=(--images_per_class "$IMAGES_PER_CLASS")
        [ -n "${SCHEDULER:-}" ] && train+=(--scheduler "$SCHEDULER")
        [ -n "${VAL_FRACTION:-}" ] && train+=(--val_fraction "$VAL_FRACTION")
        [ "${FREEZE:-0}" = 1 ] && train+=(--freeze)
        [ "${SCRATCH:-0}" = 1 ] && train+=(--scratch)
        # shellcheck disable=SC2206  # extra flags are meant to split on spaces
        [ -n "${TRAIN_ARGS:-}" ] && train+=(${TRAIN_ARGS})
        rm -f "$dir/extractor.best.pt"  # a best epoch left by an earlier run of this name is not this run's
        echo "--- train: ${train[*]}" | tee -a "$log"
        start="$(date +%s.%N)"
        "${train[@]}" 2>&1 | tee -a "$log"
        train_s="$(seconds_since "$start")"
        extractor=(--weights "$dir/extractor.pt")
        # With a validation share, cbir-train also keeps the best epoch: index and evaluate that one.
        [ -f "$dir/extractor.best.pt" ] && extractor=(--weights "$dir/extractor.best.pt")
    fi

    local index=("$INDEX" --path "$INDEX_DATA" --db_name "$db" --rewrite --batch_size "$BATCH_SIZE"
                 "${extractor[@]}" "${common[@]}")
    # shellcheck disable=SC2206
    [ -n "${INDEX_ARGS:-}" ] && index+=(${INDEX_ARGS})
    echo "--- index: ${index[*]}" | tee -a "$log"
    start="$(date +%s.%N)"
    "${index[@]}" 2>&1 | tee -a "$log"
    index_s="$(seconds_since "$start")"

    if [ "$TRAIN_INDEX" = 1 ]; then
        local ivf=("$TRAIN_IDX" --db_name "$db")
        [ -n "${NLIST:-}" ] && ivf+=(--nlist "$NLIST")
        echo "--- train-index: ${ivf[*]}" | tee -a "$log"
        start="$(date +%s.%N)"
        "${ivf[@]}" 2>&1 | tee -a "$log"
        train_index_s="$(seconds_since "$start")"
    fi

    local evals=() protocol
    for protocol in $PROTOCOLS; do
        local evaluate=("$EVAL" --path "$QUERY_DATA" --db_name "$db" --measure "$protocol" --seed "$SEED"
                        --batch_size "$BATCH_SIZE" --output "$dir/eval_$protocol.json" "${common[@]}")
        [ -n "${NPROBE:-}" ] && evaluate+=(--nprobe "$NPROBE")
        if [ "$protocol" = separated ]; then
            # Per-class rows: a sheet of the same workbook, named after the run (Excel allows 31 characters).
            evaluate+=(--excel_path "$WORKBOOK" --name "${name:0:31}")
        fi
        # shellcheck disable=SC2206
        [ -n "${EVAL_ARGS:-}" ] && evaluate+=(${EVAL_ARGS})
        echo "--- eval $protocol: ${evaluate[*]}" | tee -a "$log"
        "${evaluate[@]}" 2>&1 | tee -a "$log"
        evals+=("$protocol=$dir/eval_$protocol.json")
    done

    local params=(--param "model=$model" --param "loss=$loss" --param "frozen=$([ "$frozen" = 1 ] && echo true || echo false)"
                  --param "num_features=$([ "$frozen" = 1 ] && echo 0 || echo "$NUM_FEATURES")"
                  --param "epochs=$([ "$frozen" = 1 ] && echo 0 || echo "$EPOCHS")"
                  --param "batch_size=$BATCH_SIZE" --param "lr=$([ "$frozen" = 1 ] && echo || echo "$LR")"
                  --param "input_size=${INPUT_SIZE:-}" --param "max_batches=${MAX_BATCHES:-}"
                  --param "images_per_class=${IMAGES_PER_CLASS:-}" --param "scheduler=${SCHEDULER:-}"
                  --param "freeze=$([ "${FREEZE:-0}" = 1 ] && echo true || echo false)"
                  --param "scratch=$([ "${SCRATCH:-0}" = 1 ] && echo true || echo false)"
                  --param "seed=$SEED" --param "ivf=$([ "$TRAIN_INDEX" = 1 ] && echo true || echo false)"
                  --param "device=$device" --param "data=$TRAIN_DATA" --param "db_name=$db"
                  --param "train_args=${TRAIN_ARGS:-}")
    "$python" -m cbir.cli.results append --workbook "$WORKBOOK" --run-name "$name" "${params[@]}" \
        --timing "train_s=$train_s" --timing "index_s=$index_s" --timing "train_index_s=$train_index_s" \
        --eval-json "${evals[@]}" 2>&1 | tee -a "$log"
}

failed=()
for pair in $RUNS; do
    model="${pair%%:*}"
    loss="${pair#*:}"
    [ "$loss" = "$pair" ] && loss=margin
    # A subshell with errexit: the first failing step ends this run only.
    set +e
    (set -e; run_one "$model" "$loss")
    status=$?
    set -e
    if [ "$status" != 0 ]; then
        echo "!!! run $model:$loss failed (exit $status); its log: $OUT_DIR/" >&2
        failed+=("$model:$loss")
        [ "$KEEP_GOING" = 1 ] || exit "$status"
    fi
done

echo
"$python" -m cbir.cli.results table --workbook "$WORKBOOK" || true
if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed runs: ${failed[*]}" >&2
    exit 1
fi
