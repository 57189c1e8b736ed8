#!/usr/bin/env bash
#
# submit-capture.sh — capture an activation store on a Slurm cluster: a job
# array of N `afprobe capture --shard I/N` tasks, then a merge job that runs
# only if every task succeeded.
#
# USAGE
#   scripts/slurm/submit-capture.sh [OPTIONS] PROMPTS OUT N [CAPTURE FLAGS...]
#
#   e.g. scripts/slurm/submit-capture.sh prompts.jsonl activations/study 8 \
#            --model smollm2-135m --hooks resid_post --positions last,cue --score
#
#   Submits, from the current directory (the jobs run there, so it must be on a
#   file system the compute nodes share):
#     1. sbatch --array=0-(N-1) scripts/slurm/capture-array.sbatch PROMPTS OUT FLAGS...
#        task I writes slice I of the run to OUT.slices/I
#     2. sbatch --dependency=afterok:<array job> --kill-on-invalid-dep=yes
#               scripts/slurm/merge-slices.sbatch OUT N
#        joins the slices into OUT (`afprobe store merge`) and verifies it; if a
#        task fails, Slurm cancels this job instead (fix, resubmit the failed
#        task ids with `sbatch --array=...` of step 1 and AFPROBE_SHARDS=N set,
#        then run step 2 again)
#   Job logs go to OUT.slices/logs/ (capture-<array job>_<task>.out, merge-<job>.out).
#   Prints ARRAY_JOB=<id> and MERGE_JOB=<id> on stdout (for `eval`); watch with
#   `squeue -j <id>`. OUT is complete when OUT/manifest.json says "complete": true.
#
#   The merged store is byte-identical to the store of one uninterrupted
#   `afprobe capture --prompts PROMPTS FLAGS... --out OUT` (tests/slurm.rs checks
#   this); manifest.json records PROMPTS and --model as written here, so give
#   the same paths to compare the two.
#
# ARGUMENTS
#   PROMPTS          prompt file (JSONL), as for `afprobe capture --prompts`
#   OUT              the final store directory (slices go to OUT.slices/)
#   N                number of slices = array tasks (1 or more). A task with no
#                    shard block of its own writes an empty slice, so choose
#                    N <= ceil(rows / --shard-rows) (default --shard-rows 256)
#   CAPTURE FLAGS    passed to every `afprobe capture` unchanged: --model,
#                    --adapter, --hooks, --layers, --positions, --dtype,
#                    --weights-dtype, --score, --p-refuse, --refusal-openings,
#                    --shard-rows, --no-prefix-sharing, --force (not --prompts,
#                    --out, --shard, --resume: the scripts set them)
#
# OPTIONS (before PROMPTS)
#   --sbatch ARG     add ARG to both sbatch calls (repeatable), e.g.
#                    --sbatch --partition=gpu --sbatch --time=02:00:00
#                    --sbatch --cpus-per-task=8 (afprobe then uses 8 threads)
#   --array-throttle K   run at most K tasks at once (--array=0-(N-1)%K)
#   -n, --dry-run    print the two sbatch commands instead of submitting
#   -h, --help       this text
#   sbatch's own input variables (SBATCH_PARTITION, SBATCH_ACCOUNT,
#   SBATCH_TIMELIMIT, ...) apply to both jobs as well.
#
# ENVIRONMENT
#   AFPROBE   the afprobe binary; default `afprobe` on PATH, then
#             ./target/release/afprobe, then this checkout's target/release/afprobe.
#             Resolved here to an absolute path and exported to the jobs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() {
    echo "submit-capture.sh: error: $*" >&2
    exit 2
}
usage() {
    sed -n '/^# submit-capture.sh —/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//; s/^#$//'
}

sbatch_args=()
throttle=
dry_run=false
while [[ $# -gt 0 ]]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --sbatch)
        [[ $# -ge 2 ]] || die "--sbatch needs an argument, e.g. --sbatch --partition=gpu"
        sbatch_args+=("$2")
        shift 2
        ;;
    --sbatch=*)
        sbatch_args+=("${1#--sbatch=}")
        shift
        ;;
    --array-throttle)
        [[ $# -ge 2 && $2 =~ ^[1-9][0-9]*$ ]] || die "--array-throttle needs a positive integer"
        throttle=%$2
        shift 2
        ;;
    -n | --dry-run)
        dry_run=true
        shift
        ;;
    --)
        shift
        break
        ;;
    -*) die "unknown option $1 (options go before PROMPTS OUT N; capture flags after them); see --help" ;;
    *) break ;;
    esac
done

[[ $# -ge 3 ]] || die "expected PROMPTS OUT N [CAPTURE FLAGS...], got $# argument(s); see --help"
prompts=$1
out=$2
shards=$3
shift 3
[[ $shards =~ ^[1-9][0-9]*$ ]] || die "N (number of slices) must be a positive integer, got '$shards'"
[[ -f $prompts && -r $prompts ]] || die "prompt file $prompts does not exist or is not readable"
[[ $out != */ ]] || out=${out%/}
[[ -n $out ]] || die "OUT must not be empty or /"

force=()
for flag in "$@"; do
    case $flag in
    --prompts | --prompts=* | --out | --out=* | --shard | --shard=* | --resume)
        die "$flag is set by the scripts; give PROMPTS OUT N as arguments and leave out --prompts/--out/--shard/--resume"
        ;;
    --force) force=(--force) ;;
    esac
done
if [[ ${#force[@]} -eq 0 && -e $out/manifest.json ]]; then
    die "$out already holds a store; pass --force (a capture flag) to overwrite it, or choose another OUT"
fi

afprobe=${AFPROBE:-}
if [[ -z $afprobe ]]; then
    if command -v afprobe >/dev/null 2>&1; then
        afprobe=$(command -v afprobe)
    elif [[ -x ./target/release/afprobe ]]; then
        afprobe=./target/release/afprobe
    elif [[ -x $here/../../target/release/afprobe ]]; then
        afprobe=$here/../../target/release/afprobe
    else
        die "no afprobe binary: set AFPROBE=/path/to/afprobe, put afprobe on PATH, or build ./target/release/afprobe with cargo build --release"
    fi
fi
[[ -f $afprobe && -x $afprobe ]] || die "AFPROBE=$afprobe is not an executable file"
afprobe=$(cd "$(dirname "$afprobe")" && pwd)/$(basename "$afprobe")

if ! $dry_run; then
    command -v sbatch >/dev/null 2>&1 ||
        die "sbatch not found on PATH: run this on a Slurm login node (or start a one-node cluster here: scripts/slurm/local-cluster.sh start)"
fi

logs=$out.slices/logs
name=$(basename "$out")
export AFPROBE=$afprobe AFPROBE_SHARDS=$shards
array_cmd=(sbatch --parsable --job-name="afprobe-capture-$name" --array="0-$((shards - 1))$throttle"
    --output="$logs/capture-%A_%a.out" --chdir="$PWD" --export=ALL "${sbatch_args[@]}"
    "$here/capture-array.sbatch" "$prompts" "$out" "$@")
merge_cmd=(sbatch --parsable --job-name="afprobe-merge-$name" --kill-on-invalid-dep=yes
    --output="$logs/merge-%j.out" --chdir="$PWD" --export=ALL "${sbatch_args[@]}"
    "$here/merge-slices.sbatch" "$out" "$shards" "${force[@]}")

if $dry_run; then
    printf 'AFPROBE=%q AFPROBE_SHARDS=%q' "$afprobe" "$shards"
    printf ' %q' "${array_cmd[@]}"
    printf '\n'
    printf 'AFPROBE=%q' "$afprobe"
    printf ' %q' "${merge_cmd[@]:0:2}" "--dependency=afterok:<array job>" "${merge_cmd[@]:2}"
    printf '\n'
    exit 0
fi

mkdir -p "$logs"
array_job=$("${array_cmd[@]}") || die "sbatch of the capture array failed (see its message above)"
array_job=${array_job%%;*}
[[ $array_job =~ ^[0-9]+$ ]] || die "sbatch printed '$array_job', not a job id"
merge_job=$("${merge_cmd[@]:0:2}" --dependency="afterok:$array_job" "${merge_cmd[@]:2}") || {
    scancel "$array_job" 2>/dev/null || true
    die "sbatch of the merge job failed (see its message above); cancelled array job $array_job"
}
merge_job=${merge_job%%;*}

echo "submit-capture.sh: array job $array_job: $shards tasks of afprobe capture -> $out.slices/{0..$((shards - 1))}" >&2
echo "submit-capture.sh: merge job $merge_job (after every task succeeds) -> $out; logs in $logs/" >&2
echo "ARRAY_JOB=$array_job"
echo "MERGE_JOB=$merge_job"
