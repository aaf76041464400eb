#!/usr/bin/env bash
# tests/gpu/check.sh: wattd's GPU attribution on a real NVIDIA GPU.
#
# Usage: sudo tests/gpu/check.sh /path/to/wattd [SECONDS]
#
# Needs: root (it creates cgroups), cgroup v2, an NVIDIA GPU with its driver, python3 with
# PyTorch (CUDA). Optional: pynvml (pip package nvidia-ml-py) or an nvidia-smi that knows
# `total_energy_consumption`, for an NVML counter reading independent of wattd.
#
# What it does: creates two cgroups, starts one GPU workload in each (matmul loops on the same
# GPU with duty cycles of about 30 % and 90 %), runs `wattd run` with a temporary config whose
# run pattern matches the two cgroups for SECONDS (default 60), stops it, and prints what the
# records say for the GPU: the counter delta wattd measured (and NVML's own delta over wattd's
# lifetime when it can be read), each run's energy, the host's, the idle part, their sum, and
# the runs' energy ratio against their SM-utilisation ratio. Every cgroup, process and file it
# made is removed on exit, also on Ctrl-C. It finishes within 5 minutes (every step is bounded).
set -euo pipefail

WATTD=${1:-}
SECONDS_RUN=${2:-60}
if [[ -z "$WATTD" || ! -x "$WATTD" ]]; then
    echo "usage: $0 /path/to/wattd [SECONDS]" >&2
    exit 64
fi
if ! [[ "$SECONDS_RUN" =~ ^[0-9]+$ ]] || ((SECONDS_RUN < 10 || SECONDS_RUN > 200)); then
    echo "SECONDS must be 10 ..= 200 (the whole check must fit in 5 minutes)" >&2
    exit 64
fi
WATTD=$(readlink -f "$WATTD")
if [[ $(id -u) -ne 0 ]]; then
    echo "run as root: the check creates cgroups and wattd reads every process's cgroup" >&2
    exit 64
fi
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 1; }
if ! timeout 120 python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "PyTorch with CUDA is not usable here (python3 -c 'import torch; torch.cuda.is_available()')" >&2
    exit 1
fi

# The cgroup2 mount, from mountinfo (field 5 is the mount point, the fstype follows the " - ").
CG=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo | head -n 1)
if [[ -z "$CG" || ! -d "$CG" ]]; then
    echo "no cgroup2 mount in /proc/self/mountinfo" >&2
    exit 1
fi

WORK=$(mktemp -d /tmp/wattd-gpucheck.XXXXXX)
PARENT_NAME="wattd-gpucheck-$$"
PARENT="$CG/$PARENT_NAME"
WATTD_PID=""
LOAD_PIDS=()

cleanup() {
    set +e
    for p in "${LOAD_PIDS[@]}"; do
        kill "$p" 2>/dev/null
    done
    if [[ -n "$WATTD_PID" ]]; then
        kill -TERM "$WATTD_PID" 2>/dev/null
        for _ in $(seq 50); do
            kill -0 "$WATTD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$WATTD_PID" 2>/dev/null
    fi
    for p in "${LOAD_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null
    done
    for run in light heavy; do
        d="$PARENT/run-$run.scope"
        if [[ -d "$d" ]]; then
            # Anything still inside (a child the workload forked) is killed, then the dir goes.
            while read -r p; do kill -KILL "$p" 2>/dev/null; done <"$d/cgroup.procs"
            for _ in $(seq 50); do
                rmdir "$d" 2>/dev/null && break
                sleep 0.1
            done
        fi
    done
    [[ -d "$PARENT" ]] && rmdir "$PARENT" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir "$PARENT" "$PARENT/run-light.scope" "$PARENT/run-heavy.scope"

# NVML's own counter, in mJ, for every GPU: pynvml if present, else nvidia-smi, else nothing.
nvml_energy() {
    python3 - <<'PY' 2>/dev/null && return 0
import pynvml
pynvml.nvmlInit()
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    print(i, pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
PY
    timeout 20 nvidia-smi --query-gpu=index,total_energy_consumption --format=csv,noheader,nounits 2>/dev/null |
        awk -F', *' '$2 ~ /^[0-9.]+$/ { printf "%s %d\n", $1, $2 }' | grep . && return 0
    return 1
}

cat >"$WORK/load.py" <<'PY'
# A GPU load with a duty cycle: matmuls for DUTY of every 200 ms, idle the rest.
import sys, time
import torch
duty, secs = float(sys.argv[1]), float(sys.argv[2])
dev = torch.device("cuda:0")
a = torch.randn(4096, 4096, device=dev)
b = torch.randn(4096, 4096, device=dev)
period, end = 0.2, time.time() + secs
while time.time() < end:
    t0 = time.time()
    while time.time() - t0 < duty * period:
        c = a @ b
        torch.cuda.synchronize()
    rest = period - (time.time() - t0)
    if rest > 0:
        time.sleep(rest)
PY

cat >"$WORK/wattd.toml" <<EOF
[sampling]
interval_ms = 1000
[host]
cgroup_root = "$CG"
[runs]
patterns = ["$PARENT_NAME/run-{run_id}.scope"]
control_socket = "$WORK/control.sock"
[attribution]
idle_policy = "proportional"
[spool]
dir = "$WORK/spool"
[metrics]
listen = "127.0.0.1:0"
[gpu]
read_timeout_ms = 2000
EOF
"$WATTD" validate --config "$WORK/wattd.toml"
# probe exits 1 when a GPU is present but not measured: the report is what is wanted here.
{ "$WATTD" probe --format text || true; } | sed -n '/^gpu (nvml)/,$p'

# CUDA numbers GPUs by its own order unless told to use the PCI bus order, which NVML uses.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export CUDA_VISIBLE_DEVICES
GPU_INDEX=${CUDA_VISIBLE_DEVICES%%,*}

nvml_energy >"$WORK/energy.before" || true
"$WATTD" run --config "$WORK/wattd.toml" 2>"$WORK/wattd.log" &
WATTD_PID=$!
sleep 3
kill -0 "$WATTD_PID" || { cat "$WORK/wattd.log" >&2; exit 1; }

# Each workload enters its cgroup before it execs, so all of its life is in the run.
start_load() {
    local run=$1 duty=$2
    bash -c 'echo $$ >"$1/cgroup.procs" && exec timeout "$2" python3 "$3" "$4" "$5"' _ \
        "$PARENT/run-$run.scope" "$((SECONDS_RUN + 30))" "$WORK/load.py" "$duty" "$SECONDS_RUN" &
    LOAD_PIDS+=("$!")
}
start_load light 0.3
start_load heavy 0.9
echo "measuring for ${SECONDS_RUN} s (runs light at ~30 % and heavy at ~90 % duty on GPU $GPU_INDEX)..."
for p in "${LOAD_PIDS[@]}"; do
    wait "$p" || echo "a workload exited with $?" >&2
done
LOAD_PIDS=()
sleep 3
kill -TERM "$WATTD_PID"
wait "$WATTD_PID" || { echo "wattd exited with $?" >&2; tail -n 20 "$WORK/wattd.log" >&2; }
WATTD_PID=""
nvml_energy >"$WORK/energy.after" || true

"$WATTD" verify --data-dir "$WORK/spool" | tail -n 1
"$WATTD" export --data-dir "$WORK/spool" >"$WORK/batches.bin"

# The records, decoded here with a small protobuf reader (no dependency), so the table is an
# independent reading of what wattd sealed.
python3 - "$WORK/batches.bin" "$GPU_INDEX" "$WORK/energy.before" "$WORK/energy.after" <<'PY'
import sys

def varint(b, i):
    v = s = 0
    while True:
        x = b[i]; i += 1
        v |= (x & 0x7F) << s; s += 7
        if x < 0x80:
            return v, i

def fields(b):
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        n, t = key >> 3, key & 7
        if t == 0:
            v, i = varint(b, i)
        elif t == 2:
            ln, i = varint(b, i); v = b[i:i + ln]; i += ln
        elif t == 1:
            v = int.from_bytes(b[i:i + 8], "little"); i += 8
        elif t == 5:
            v = int.from_bytes(b[i:i + 4], "little"); i += 4
        else:
            raise ValueError("wire type %d" % t)
        yield n, v

path, gpu = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
seen, i = set(), 0
measured = host_active = host_idle = unattr = 0
idle = 0
runs, usage = {}, {}
intervals = gaps = 0
while i < len(data):
    ln, i = varint(data, i)
    signed = dict((n, v) for n, v in fields(data[i:i + ln])); i += ln
    batch = list(fields(signed[1]))
    seq = next(v for n, v in batch if n == 4)
    if seq in seen:
        continue
    seen.add(seq)
    for n, iv in batch:
        if n != 8:
            continue
        for m, d in fields(iv):
            if m != 9:
                continue
            f = list(fields(d))
            get = lambda k, default=0: next((v for n2, v in f if n2 == k), default)
            if get(1, b"") != b"gpu" or get(2, None) != gpu:
                continue
            intervals += 1
            if get(13):
                gaps += 1
            measured += get(5)
            host_active += get(9)
            host_idle += get(10)
            for n2, v in f:
                if n2 == 8:
                    a = dict(fields(v))
                    rid = a.get(1, b"").decode()
                    runs[rid] = runs.get(rid, 0) + a.get(2, 0) + a.get(3, 0)
                    idle += a.get(3, 0)
                    usage[rid] = usage.get(rid, 0) + a.get(4, 0)
                if n2 == 11:
                    unattr += dict(fields(v)).get(2, 0)
idle += host_idle

def read(p):
    try:
        return {int(a): int(b) for a, b in (l.split() for l in open(p) if l.strip())}
    except Exception:
        return {}

before, after = read(sys.argv[3]), read(sys.argv[4])
J = 1e6
print()
print("GPU %d, %d intervals in the records (%d with a gap)" % (gpu, intervals, gaps))
if gpu in before and gpu in after:
    print("%-44s %14.3f J" % ("NVML counter delta over wattd's life", (after[gpu] - before[gpu]) / 1e3))
else:
    print("%-44s %14s" % ("NVML counter delta over wattd's life", "unreadable"))
print("%-44s %14.3f J" % ("counter delta measured by wattd (records)", measured / J))
for rid in sorted(runs):
    print("%-44s %14.3f J" % ("run " + rid, runs[rid] / J))
print("%-44s %14.3f J" % ("host (active + idle share)", (host_active + host_idle) / J))
print("%-44s %14.3f J" % ("  of which idle, all buckets", idle / J))
print("%-44s %14.3f J" % ("unattributed", unattr / J))
total = sum(runs.values()) + host_active + host_idle + unattr
print("%-44s %14.3f J  (residual %d uJ)" % ("sum", total / J, total - measured))
h, l = runs.get("heavy", 0), runs.get("light", 0)
uh, ul = usage.get("heavy", 0), usage.get("light", 0)
if l and ul:
    print("%-44s %14.3f" % ("energy ratio heavy / light", h / l))
    print("%-44s %14.3f  (nominal duty 0.9 / 0.3 = 3.000)" % ("SM utilisation ratio heavy / light", uh / ul))
else:
    print("a run got no GPU energy or usage: see the wattd log")
sys.exit(0 if total == measured else 1)
PY
