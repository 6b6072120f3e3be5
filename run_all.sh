#!/usr/bin/env bash
# The paper's experiment section: one line per (figure, method, setting, seed), with its flags.
#
#   bash run_all.sh                         # everything, on the CPU or on every GPU in GPUS
#   GPUS=0,1,2,3 bash run_all.sh            # four lanes, one per GPU (CUDA_VISIBLE_DEVICES)
#   QUICK=1 bash run_all.sh                 # few tasks and steps: every figure, in minutes
#   DRY_RUN=1 bash run_all.sh               # print the lanes and the queue, run nothing
#   LIST=1 bash run_all.sh | parallel -j 4 'CUDA_VISIBLE_DEVICES=$(({%} - 1)) bash -c {}'
#                                           # the data fetched, then a line per run (its log,
#                                           # skipped if done): GNU parallel (job slot k on
#                                           # GPU k-1) or another scheduler
#   ONLY=fig3 bash run_all.sh               # only the runs whose name matches (grep -E)
#   SLURM=1 bash run_all.sh                 # one Slurm job array, a run per task (below)
#   STATUS=1 bash run_all.sh                # which runs are done, running, queued, failed
#   python plot.py runs --out figures       # then the figures and the table
#
# Knobs: GPUS (comma list; empty: one CPU lane), SEEDS (default 0 1 2 3 4; QUICK: 1 2), DATA
# (MNIST and CIFAR-100 are read there, downloaded once before the lanes start if missing;
# default data), IMAGENET (an ImageFolder tree with train/ and val/; default $DATA/imagenet),
# OUT (default runs), ONLY (a pattern over run names). Lanes take runs from one queue in
# order. Every run writes OUT/NAME/ with its own log.txt; a finished run is skipped, an
# interrupted one resumes (the scripts resume from their checkpoints). The script waits for
# every lane and exits 1 naming the runs that failed.
#
# SLURM=1 submits the selected runs that are neither done nor queued as one job array
# (slurm_job.sh: a run per array task, its output in OUT/NAME/log.txt), after the data are in
# place, with --requeue, and then a job that writes OUT/status.txt and the figures once the
# array has ended. Resources per run: SLURM_GPUS (default 1 where sinfo lists a GPU, else 0;
# --gres=gpu:N), SLURM_CPUS (4), SLURM_MEM (16G), SLURM_TIME (24:00:00), and SLURM_MAX runs
# at once (20); SBATCH_EXTRA adds sbatch options (e.g. "--partition=gpu --account=lab
# --qos=normal"). A preempted, requeued or timed-out run resumes from its checkpoint; the same
# command submits what is left.
set -u
cd "$(dirname "$0")"
GPUS=${GPUS-}
QUICK=${QUICK:-0}
[ "$QUICK" = 1 ] && SEEDS=${SEEDS:-1 2}  # two seeds still draw the bands
SEEDS=${SEEDS:-0 1 2 3 4}
DATA=${DATA:-data}
IMAGENET=${IMAGENET:-$DATA/imagenet}
OUT=${OUT:-runs}
DRY_RUN=${DRY_RUN:-0}
LIST=${LIST:-0}
ONLY=${ONLY:-}
SLURM=${SLURM:-0}
STATUS=${STATUS:-0}

CIFAR=$DATA
GG="" IN="" GN="" GN2500="" NNS="" ROT="" HOP="" GN20="--tasks 20"
if [ "$QUICK" = 1 ]; then  # a few tasks and steps; synthetic CIFAR-100 and ImageNet files
    CIFAR=$OUT/synthetic IMAGENET=$OUT/synthetic/imagenet
    GG="--tasks 2 --epochs 1"
    IN="--tasks 2 --epochs 1 --batch-size 8 --workers 0"
    GN="--tasks 3 --steps 50 --eval-at 1,2"
    GN20=$GN
    GN2500="--tasks 3 --steps 50 --eval-at 1,2"
    NNS="--tasks 3 --steps 200 --eval-at 1,2"
    ROT="--tasks 3 --steps 50 --eval-at 1,2"
    HOP="--tasks 2 --steps 20"
fi

# The comparison methods, from their registry (methods/__init__.py, table()): a line each of
# name, runs in run_gn.py, runs in run_gg.py, one of the paper's lines, in the plasticity
# figure (1 or 0), and the PermutedMNIST tasks of its runs beside Fig. 3 left
if ! METHOD_TABLE=$(python -c "import methods; print(methods.table())"); then
    echo "run_all.sh: cannot read the methods' registry (python -c 'import methods' failed above)" >&2
    exit 1
fi
methods_where() {  # an awk condition over the table's columns -> the names, space-separated
    awk "$1 {printf \"%s \", \$1}" <<< "$METHOD_TABLE"
}
GG_METHODS=$(methods_where '$3')                    # Fig. 2, SplitCIFAR100
GG_OTHERS=$(methods_where '$3 && !$4')              # TAG's one-epoch protocol, beside SupSup
GN_BOTH_NETS=$(methods_where '$2 && ($4 || $5)')    # Fig. 3, LeNet and FC-1024
GN_250=$(methods_where '$2 && !$4 && !$5 && $6 == 250')  # beside Fig. 3 left, 250 tasks
GN_20=$(methods_where '$2 && !$4 && !$5 && $6 == 20')    # beside SupSup, 20 tasks

emit() {  # NAME COMMAND...: one run, written as NAME<TAB>COMMAND --out OUT/NAME, each word
    local name=$1 cmd  # quoted for bash (a folder name may hold spaces)
    shift
    printf -v cmd '%q ' "$@" --out "$OUT/$name"
    printf '%s\t%s\n' "$name" "${cmd% }"
}

runs() {
    local seed s m model obj
    for seed in $SEEDS; do
        # Fig. 2 right: SplitCIFAR100, GEMResNet-18, accuracy against bytes
        for s in 1 2 4 8 16 32; do
            for m in supsup supsup-transfer; do
                emit "fig2-splitcifar100-$m-s$s-seed$seed" python run_gg.py --data "$CIFAR" \
                    --method $m --sparsity $s --seed "$seed" $GG
            done
        done
        for m in $GG_METHODS; do  # the paper's comparison lines and the other methods
            emit "fig2-splitcifar100-$m-seed$seed" python run_gg.py --data "$CIFAR" --method $m \
                --seed "$seed" $GG
        done
        emit "fig2-splitcifar100-modelzoo-b1-seed$seed" python run_gg.py --data "$CIFAR" \
            --method modelzoo --zoo-b 1 --seed "$seed" $GG  # Model Zoo's "Isolated"
        # TAG's protocol on SplitCIFAR100: one epoch per task at batch 10 (its paper's)
        for m in supsup $GG_OTHERS; do
            emit "tag-splitcifar100-$m-seed$seed" python run_gg.py --data "$CIFAR" --method $m \
                --seed "$seed" $GG --epochs 1 --batch-size 10
        done
        # Fig. 3: PermutedMNIST, 250 tasks; LeNet s=100 (left), FC s=500 (right); H and G
        for model in lenet fc1024; do
            for obj in entropy g; do
                emit "fig3-permuted-$model-supsup-$obj-seed$seed" python run_gn.py \
                    --data "$DATA" --model $model --objective $obj --seed "$seed" $GN
            done
            for m in $GN_BOTH_NETS; do  # the paper's lines, and plasticity (bp, cbp)
                emit "fig3-permuted-$model-$m-seed$seed" python run_gn.py --data "$DATA" \
                    --model $model --method $m --seed "$seed" $GN
            done
        done
        # Model Zoo (b = 5 and Isolated), WSN and SupSup on 20 PermutedMNIST tasks, LeNet
        for m in supsup $GN_20; do
            emit "permuted20-$m-seed$seed" python run_gn.py --data "$DATA" --method $m \
                --seed "$seed" $GN20
        done
        emit "permuted20-modelzoo-b1-seed$seed" python run_gn.py --data "$DATA" \
            --method modelzoo --zoo-b 1 --seed "$seed" $GN20
        for m in $GN_250; do  # the other continual-learning methods beside Fig. 3 left
            emit "fig3-permuted-lenet-$m-seed$seed" python run_gn.py --data "$DATA" --method $m \
                --seed "$seed" $GN
        done
        # Fig. 4: 2500 tasks, LeNet s=500: GNu (H and G) and NNs
        for obj in entropy g; do
            emit "fig4-gnu2500-$obj-seed$seed" python run_gn.py --data "$DATA" --tasks 2500 \
                --output-size 500 --objective $obj --seed "$seed" $GN2500
        done
        emit "fig4-nns-seed$seed" python run_nns.py --data "$DATA" --seed "$seed" $NNS
        # Fig. 5 left: RotatedMNIST, FC s=200, binary H on the full batch; BatchE and PSP (GG)
        emit "fig5-rotated-supsup-seed$seed" python run_gn.py --data "$DATA" --dataset rotated \
            --seed "$seed" $ROT
        for m in batche psp; do
            emit "fig5-rotated-$m-seed$seed" python run_gn.py --data "$DATA" --dataset rotated \
                --method $m --seed "$seed" $ROT
        done
        # Fig. 5 right: one-shot BatchE, FC s=500, PermutedMNIST
        emit "fig5-oneshot-batche-seed$seed" python run_gn.py --data "$DATA" --method batche \
            --infer oneshot --model fc1024 --output-size 500 --seed "$seed" $GN
        # Fig. 6: output size s = 25, 100, 200 with H and G (LeNet's s = 100 and the bounds
        # are Fig. 3's runs)
        for model in lenet fc1024; do
            for s in 25 100 200; do
                [ $model$s = lenet100 ] && continue
                for obj in entropy g; do
                    emit "fig6-$model-s$s-$obj-seed$seed" python run_gn.py --data "$DATA" \
                        --model $model --output-size $s --objective $obj --seed "$seed" $GN
                done
            done
        done
        # Fig. 7 (appendix): HopSupSup on SplitMNIST
        emit "fig7-hopsupsup-seed$seed" python hopsupsup.py --data "$DATA" --seed "$seed" $HOP
    done
    # Fig. 2 left: SplitImageNet, ResNet-50, one fixed split and seed; SupSup s = 4, 8, 16
    for s in 4 8 16; do
        emit "fig2-splitimagenet-supsup-s$s" python run_gg.py --dataset splitimagenet \
            --data "$IMAGENET" --sparsity $s $IN
    done
    for m in batche upper-bound; do
        emit "fig2-splitimagenet-$m" python run_gg.py --dataset splitimagenet \
            --data "$IMAGENET" --method $m $IN
    done
}

mapfile -t LINES < <(runs | awk -F '\t' -v only="$ONLY" '$1 ~ only')
if [ ${#LINES[@]} -eq 0 ]; then
    echo "no run's name matches ONLY=$ONLY (the names: the --out folders of LIST=1 bash run_all.sh)" >&2
    exit 1
fi
queued() {  # the runs of our earlier arrays that Slurm still holds: NAME STATE per line
    local job_file job list
    for job_file in "$OUT"/.slurm/*.job; do
        [ -f "$job_file" ] || continue
        job=$(< "$job_file") list=${job_file%.job}
        squeue -h -r -j "$job" -o '%K %T' 2> /dev/null | while read -r task state; do
            printf '%s %s\n' "$(sed -n "${task}p" "$list" | cut -f1)" "$state"
        done
    done
}
if [ "$STATUS" = 1 ]; then  # reads the run folders (and Slurm's queue), changes nothing
    held=$(command -v squeue > /dev/null && queued)
    declare -A count=()
    for line in "${LINES[@]}"; do
        name=${line%%$'\t'*} dir=$OUT/${line%%$'\t'*}
        if [ -f "$dir/.done" ]; then
            state=done
        elif [ -f "$dir/.lock" ] && ! flock -n "$dir/.lock" true 2> /dev/null; then
            state=running
        elif state=$(awk -v n="$name" '$1 == n {print tolower($2); exit}' <<< "$held") &&
                [ -n "$state" ]; then
            :  # pending, or running on a node whose lock this machine cannot see
        elif [ -f "$dir/log.txt" ]; then
            state=failed
        else
            state=missing
        fi
        count[$state]=$(( ${count[$state]:-0} + 1 ))
        case $state in
            done) ;;
            failed) printf '%-8s %s: %s\n' "$state" "$name" "$(tail -n 1 "$dir/log.txt")" ;;
            *) printf '%-8s %s\n' "$state" "$name" ;;
        esac
    done
    summary=""
    for state in done running pending failed missing "${!count[@]}"; do
        [ -n "${count[$state]:-}" ] && summary+="${count[$state]} $state, " && unset "count[$state]"
    done
    echo "${#LINES[@]} runs in $OUT: ${summary%, }"
    exit 0
fi
IFS=, read -r -a LANES <<< "$GPUS"
[ ${#LANES[@]} -eq 0 ] && LANES=(cpu)
if [ "$DRY_RUN" = 1 ]; then  # nothing is created, deleted or run
    echo "[lanes ${LANES[*]}] each takes the next run of the queue:"
    for line in "${LINES[@]}"; do printf '[queue] %s\n' "${line#*$'\t'}"; done
    exit 0
fi
if [ "$QUICK" = 1 ]; then
    python -c "import gg_data, sys; gg_data.synthetic_cifar100(sys.argv[1]); \
gg_data.synthetic_imagefolder(sys.argv[2])" "$CIFAR" "$IMAGENET" || exit 1
fi
# download what the runs need once, here, so that lanes never download into one folder at
# once (SplitImageNet cannot be downloaded: it must be in IMAGENET already); LIST=1 says so on
# stderr, its stdout is the commands
names=$(printf '%s\n' "${LINES[@]}" | cut -f1)
exec 3>&1 && [ "$LIST" = 1 ] && exec 3>&2
if grep -qv -e splitcifar100 -e splitimagenet <<< "$names"; then
    python data.py --data "$DATA" >&3 || exit 1
fi
if [ "$QUICK" != 1 ] && grep -q splitcifar100 <<< "$names"; then
    python gg_data.py --data "$CIFAR" >&3 || exit 1
fi
if [ "$LIST" = 1 ]; then  # a line a run, as a lane runs it: skipped if done, its own log
    for line in "${LINES[@]}"; do
        printf -v dir '%q' "$OUT/${line%%$'\t'*}"
        echo "[ -f $dir/.done ] || { mkdir -p $dir && ${line#*$'\t'} >> $dir/log.txt 2>&1 &&" \
            "touch $dir/.done; }"
    done
    exit 0
fi

mkdir -p "$OUT"
if [ "$SLURM" = 1 ]; then
    mkdir -p "$OUT/.slurm"
    held=$(queued | cut -d' ' -f1)
    list=$(mktemp "$OUT/.slurm/runs.XXXXXX")  # NAME<TAB>COMMAND, a line per array task
    for line in "${LINES[@]}"; do
        name=${line%%$'\t'*}
        [ -f "$OUT/$name/.done" ] || grep -qxF "$name" <<< "$held" || printf '%s\n' "$line"
    done > "$list"
    n=$(wc -l < "$list")
    if [ "$n" -eq 0 ]; then
        rm -f "$list"
        echo "nothing to submit: the ${#LINES[@]} runs are done or queued (STATUS=1 bash run_all.sh)"
        exit 0
    fi
    if [ -z "${SLURM_GPUS:-}" ]; then  # one GPU a run where the cluster has GPUs
        sinfo -h -o '%G' 2> /dev/null | grep -q gpu && SLURM_GPUS=1 || SLURM_GPUS=0
    fi
    gres=() && [ "$SLURM_GPUS" != 0 ] && gres=(--gres="gpu:$SLURM_GPUS")
    # shellcheck disable=SC2086  # SBATCH_EXTRA: options, split on spaces
    if ! job=$(sbatch --parsable --job-name=supsup --array="1-$n%${SLURM_MAX:-20}" --requeue \
            --cpus-per-task="${SLURM_CPUS:-4}" --mem="${SLURM_MEM:-16G}" \
            --time="${SLURM_TIME:-24:00:00}" "${gres[@]}" --output="$OUT/.slurm/%A_%a.out" \
            ${SBATCH_EXTRA:-} slurm_job.sh "$list" "$OUT"); then
        rm -f "$list"
        echo "run_all.sh: sbatch refused the array (its message above); nothing was submitted" >&2
        exit 1
    fi
    job=${job%%;*}  # (--parsable: JOBID[;CLUSTER])
    echo "$job" > "$list.job"
    # then, whatever became of the runs: the summary and the figures (same knobs: the job
    # gets this environment)
    printf -v after 'STATUS=1 bash run_all.sh > %q; python plot.py %q --out %q' \
        "$OUT/status.txt" "$OUT" "$OUT/figures"
    # shellcheck disable=SC2086
    sbatch --parsable --job-name=supsup-status --dependency="afterany:$job" --cpus-per-task=1 \
        --mem=4G --output="$OUT/.slurm/%j.out" ${SBATCH_EXTRA:-} --wrap "$after" > /dev/null
    echo "submitted $n runs as job array $job (at most ${SLURM_MAX:-20} at once, ${SLURM_GPUS} GPU(s)," \
        "${SLURM_CPUS:-4} CPUs, ${SLURM_MEM:-16G} each); logs: $OUT/NAME/log.txt; progress:" \
        "STATUS=1 bash run_all.sh; when it ends: $OUT/status.txt and $OUT/figures"
    exit 0
fi
QUEUE=$(mktemp -d "$OUT/.queue.XXXXXX")  # run i is claimed by the lane that makes QUEUE/i
trap 'rm -rf "$QUEUE"' EXIT
rm -f "$OUT/.failed"

lane() {  # GPU: take the next unclaimed run until none is left, so lanes finish together
    local i name cmd gpu=$1
    for ((i = 0; i < ${#LINES[@]}; i++)); do
        mkdir "$QUEUE/$i" 2> /dev/null || continue  # another lane has it
        name=${LINES[i]%%$'\t'*} cmd=${LINES[i]#*$'\t'}
        [ -f "$OUT/$name/.done" ] && continue
        mkdir -p "$OUT/$name"
        echo "[lane $gpu] $name"
        # the CPU lane hides the GPUs (an empty list), a GPU lane sees its GPU only
        if CUDA_VISIBLE_DEVICES=${gpu/cpu/} bash -c "$cmd" >> "$OUT/$name/log.txt" 2>&1; then
            touch "$OUT/$name/.done"
        else
            echo "$name" >> "$OUT/.failed"
        fi
    done
}

for gpu in "${LANES[@]}"; do lane "$gpu" & done
wait
if [ -s "$OUT/.failed" ]; then
    echo "failed runs (their logs: $OUT/NAME/log.txt): $(tr '\n' ' ' < "$OUT/.failed")" >&2
    exit 1
fi
echo "all ${#LINES[@]} runs done; figures: python plot.py $OUT"
