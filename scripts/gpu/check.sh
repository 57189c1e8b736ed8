#!/usr/bin/env bash
# The GPU check of the portable engine, as one command (under ten minutes on an H100):
#
#   scripts/gpu/check.sh                        # a machine with an NVIDIA GPU (driver >= 580)
#   scripts/gpu/check.sh --device cpu --quick   # the same steps on the CPU, small sizes
#
# 1. Parity (`afprobe bench device`): the portable engine on the device at f32 against the
#    fused engine on the CPU, every hook_resid_post at the last token (relative L2 <= 1e-4)
#    and the answer tags' log-probs (<= 1e-4); the bf16 distance beside it. The default model
#    and Qwen2.5-Coder-0.5B.
# 2. Prefill tokens/s at 256/1024/4096 tokens beside PyTorch + transformers (same device,
#    same dtype, sdpa): the default model and Qwen2.5-Coder-0.5B at f32, and a random
#    Llama-3.1-8B-shaped model generated on the device at bf16.
# 3. The cost of capturing every hook_resid_post: prefill with it and without (--no-capture).
# 4. `afprobe bench capture` rows/s on the device.
#
# Needs: a Python with torch, transformers and safetensors (REF_PYTHON; default: the venv
# scripts/ref/setup_venv.sh makes in target/ref-venv, made here if missing), the CUDA build
# (scripts/cuda/build.sh, run here if target/cuda/release/afprobe is missing; AFPROBE_BIN
# overrides), and the models (fetched on first use). Everything goes to target/gpu-check;
# report.md there collects the tables.
set -euo pipefail

device=cuda
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "scripts/gpu/check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/../.." && pwd)
work=$root/target/gpu-check
mkdir -p "$work"
report=$work/report.md
cd "$root"

if [ "$quick" = 1 ]; then
    lengths=256; llama_layers=1; rows=2; capture_rows=16; repeats=1
else
    lengths=256,1024,4096; llama_layers=32; rows=8; capture_rows=200; repeats=3
fi

# The binary: the CUDA build for a GPU, the default build for the CPU.
if [ -z "${AFPROBE_BIN:-}" ]; then
    if [ "$device" = cpu ]; then
        cargo build --release --quiet
        AFPROBE_BIN=$root/target/release/afprobe
    else
        [ -x target/cuda/release/afprobe ] || scripts/cuda/build.sh
        # shellcheck disable=SC1091
        source target/cuda/env.sh
        AFPROBE_BIN=$root/target/cuda/release/afprobe
    fi
fi
py=${REF_PYTHON:-$root/target/ref-venv/bin/python}
if [ ! -x "$py" ]; then
    scripts/ref/setup_venv.sh "$root/target/ref-venv"
fi
ref_device=$device
[ "$device" = cuda ] && ref_device=cuda:0

# The portable engine everywhere (on the CPU too: it is what the GPU runs).
run() { "$AFPROBE_BIN" "$@" --device "$device" --engine portable; }
section() { printf '\n## %s\n\n```\n' "$1" >> "$report"; }
end_section() { printf '```\n' >> "$report"; }

{
    echo "# afprobe GPU check ($(date -u +%Y-%m-%d), --device $device$([ $quick = 1 ] && echo ', --quick'))"
    echo
    "$py" -c 'import torch; print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "| torch", torch.__version__)' || true
} > "$report"

hf_dir() {  # the model's GGUF (fetched by afprobe) as an HF directory for the reference
    local alias=$1 out=$work/$1-hf
    if [ ! -f "$out/config.json" ]; then
        local gguf
        gguf=$("$AFPROBE_BIN" model fetch "$alias" 2>/dev/null | tail -1)
        "$py" scripts/ref/gguf_to_hf.py "$gguf" "$out" >&2
    fi
    echo "$out"
}

for model in smollm2-135m qwen2.5-coder-0.5b; do
    section "parity: $model"
    "$AFPROBE_BIN" bench device --device "$device" --model "$model" --rows "$rows" | tee -a "$report"
    end_section
done

prefill() {  # MODEL HF_DIR DTYPE [--no-capture]
    local model=$1 dir=$2 dtype=$3; shift 3
    run bench prefill --model "$model" --dtype "$dtype" --lengths "$lengths" --repeats "$repeats" \
        --ref-python "$py" --ref-model "$dir" "$@" | tee -a "$report"
}

for model in smollm2-135m qwen2.5-coder-0.5b; do
    dir=$(hf_dir "$model")
    section "prefill: $model, f32"
    prefill "$model" "$dir" f32
    prefill "$model" "$dir" f32 --no-capture
    end_section
done

llama=$work/llama3.1-8b-shape-${llama_layers}l
if [ ! -f "$llama/config.json" ]; then
    "$py" scripts/gpu/make_random_llama.py "$llama" --layers "$llama_layers" --dtype bf16 \
        --device "$ref_device" --tokenizer-from "$(hf_dir smollm2-135m)"
fi
section "prefill: random Llama-3.1-8B shape ($llama_layers layers), bf16"
prefill "$llama" "$llama" bf16
prefill "$llama" "$llama" bf16 --no-capture
end_section

section "bench capture: the default model, f32"
run bench capture --dtype f32 --rows "$capture_rows" --unshared-rows 4 | tee -a "$report"
end_section

echo "scripts/gpu/check.sh: done; tables in $report"
