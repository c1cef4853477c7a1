"""The sbatch script of one training job: resources, launch, stop signals, requeue, chain stop.

:func:`render` writes the script that ``slurm/submit.py`` submits; the two examples beside this
file (``single_node.sbatch``, ``multi_node.sbatch``) are rendered by it too, so what a user reads
there is what the tool submits. ``python -m slurm.jobscript`` rewrites the examples.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from segmentation.launch_env import SLURM_PORT_BASE, SLURM_PORT_RANGE

# train.py's EXIT_INTERRUPTED: stopped by a signal, once an in-step checkpoint was written.
EXIT_INTERRUPTED = 3
SLURM_DIR = Path(__file__).resolve().parent


@dataclass
class JobSpec:
    """Everything a job script depends on.

    ``train_args`` None means the script passes its own arguments ("$@") to train.py, as the
    examples do (``sbatch slurm/single_node.sbatch --dataset voc ...``).
    """

    job_name: str
    description: str
    usage: str = ""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    mem: Optional[str] = None
    signal_seconds: int = 300
    max_restarts: int = 50
    output: str = "slurm-%x-%j.log"
    workdir: Optional[str] = None
    python: str = "python"
    train_script: str = "train.py"
    train_args: Optional[List[str]] = None


def _sbatch_lines(spec: JobSpec) -> List[str]:
    def line(option: str, value: object, comment: str = "") -> str:
        text = f"#SBATCH --{option}={value}"
        return f"{text:<44}# {comment}" if comment else text

    def optional(option: str, value: Optional[str], placeholder: str, comment: str) -> str:
        if value is not None:
            return line(option, value, comment)
        # Two '#': sbatch ignores the line; remove one to use it.
        return f"{'##SBATCH --' + option + '=' + placeholder:<44}# {comment} (remove one '#' to set it)"

    lines = [
        line("job-name", spec.job_name),
        line("nodes", spec.nodes),
        line("ntasks-per-node", spec.tasks_per_node, "training processes per node (one per GPU)"),
    ]
    if spec.gpus_per_node > 0:
        lines.append(line("gpus-per-node", spec.gpus_per_node))
    lines += [
        line("cpus-per-task", spec.cpus_per_task, "data-loader workers + 1"),
        optional("time", spec.time, "24:00:00", "time limit"),
        optional("mem", spec.mem, "64G", "memory per node"),
        optional("partition", spec.partition, "PARTITION", "partition"),
        optional("account", spec.account, "ACCOUNT", "account to charge"),
        line("signal", f"B:USR1@{spec.signal_seconds}", "USR1 to this script before the time limit"),
        f"{'#SBATCH --requeue':<44}# may be requeued (preemption, or by this script)",
        line("open-mode", "append", "a requeued job appends to its log"),
        line("output", spec.output, "%x: job name, %j: job id"),
    ]
    if spec.workdir is not None:
        lines.append(line("chdir", shlex.quote(spec.workdir)))
    return lines


def render(spec: JobSpec) -> str:
    """The job script of ``spec``."""
    if spec.train_args is None:
        train_args = '"$@"'
    else:
        train_args = " ".join(shlex.quote(arg) for arg in spec.train_args)
    command = f"{shlex.quote(spec.python)} {shlex.quote(spec.train_script)} {train_args}"
    header = "\n".join(_sbatch_lines(spec))
    return _TEMPLATE.format(
        description=spec.description,
        usage="".join(f"# {line}\n" for line in spec.usage.splitlines()),
        sbatch_lines=header,
        description_quoted=shlex.quote(spec.description),
        max_restarts=spec.max_restarts,
        exit_interrupted=EXIT_INTERRUPTED,
        port_base=SLURM_PORT_BASE,
        port_range=SLURM_PORT_RANGE,
        command=command,
    )


_TEMPLATE = """\
#!/bin/bash
# Slurm job: {description}.
{usage}#
# Launch: srun starts the training processes (--ntasks-per-node on each of --nodes nodes); each
# one reads its rank from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID. srun rather than
# torchrun because Slurm then starts, signals and accounts for every rank itself, on one node
# or many, and srun exits with the highest exit code of its tasks, so train.py's code 3 (stopped
# by a signal after writing a checkpoint) reaches this script; torchrun would report it as a
# failure of its own.
#
# Time limit and preemption: Slurm sends USR1 to this script shortly before the time limit
# (--signal; it may come up to a minute early) and USR1 or TERM on preemption. The script passes
# the signal on to every rank; they finish the current iteration, write an in-step checkpoint and
# exit with code 3. srun logs that as "srun: error: <node>: task N: Exited with exit code 3"; it is
# the expected stop, not a failure, as the script's next log line says. The script then requeues
# the job (scontrol requeue): it starts again with the same job id and log, resumes from the
# checkpoint and ends with the same weights as a run that was never stopped. Any other failure is
# final: the job fails and cancels the pending jobs that wait for it to succeed
# (--dependency=afterok), so no job of a chain is left pending forever.
#
# Options on the sbatch command line win over the #SBATCH lines below.
{sbatch_lines}

set -uo pipefail

DESCRIPTION={description_quoted}
MAX_RESTARTS={max_restarts}  # requeues after stop signals before the job gives up
EXIT_INTERRUPTED={exit_interrupted}  # train.py: stopped by a signal, in-step checkpoint written
RESTARTS=${{SLURM_RESTART_COUNT:-0}}

log() {{ echo "[$(date -u '+%Y-%m-%d %H:%M:%S') job $SLURM_JOB_ID] $*"; }}
# Where this start's part of the job log begins (a requeued job appends to it): failed_processes reads srun's
# lines about its tasks there.
LOG_FILE=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
LOG_START=$(stat -c %s "$LOG_FILE" 2>/dev/null || echo 0)
log "start: $DESCRIPTION; SLURM_RESTART_COUNT=$RESTARTS; nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS process(es)"

# Rendezvous of the processes: rank 0 listens on the first node of the allocation, on a port
# derived from the job id, so two jobs that share a node do not collide (a requeued job keeps its
# id, and so its port).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$(({port_base} + SLURM_JOB_ID % {port_range}))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
# torchrun's variables would win over srun's in train.py: never inherit them from the submitter.
unset RANK WORLD_SIZE LOCAL_RANK

# Pass stop signals on to every rank (srun forwards them to its tasks on all nodes).
srun_pid=""
signalled=0  # a signal came during the current wait
stopped=""   # the last stop signal received
forward() {{
    signalled=1
    stopped=$1
    log "received SIG$1: every process writes an in-step checkpoint and stops"
    [ -n "$srun_pid" ] && kill -s "$1" "$srun_pid" 2>/dev/null
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

srun --cpus-per-task="${{SLURM_CPUS_PER_TASK:-1}}" {command} &
srun_pid=$!
# bash runs a trap only when the command it waits for returns, so srun runs in the background
# and the script waits again after each signal.
while :; do
    signalled=0
    wait "$srun_pid"
    status=$?
    [ "$signalled" = 1 ] || break
done

# The processes that failed, from srun's lines in this start's part of the log ("srun: error: NODE: task R: Killed"
# becomes "rank R on NODE: Killed"), separated by "; ".
failed_processes() {{
    [ -f "$LOG_FILE" ] || return 0
    tail -c +"$((LOG_START + 1))" "$LOG_FILE" \\
        | sed -nE 's/^srun: error: ([^:]+): task ([0-9]+): (.*)$/rank \\2 on \\1: \\3/p
                   s/^srun: error: ([^:]+): tasks ([0-9,-]+): (.*)$/ranks \\2 on \\1: \\3/p' \\
        | paste -sd ';' - | sed 's/;/; /g'
}}

# Cancel the pending jobs that wait for this one to succeed, and those that wait for them.
cancel_dependants() {{
    local ids
    ids=$(squeue -h -t PENDING -u "$(id -un)" -o '%i %E' 2>/dev/null | awk -v root="$SLURM_JOB_ID" '
        {{ id[NR] = $1; dependency[NR] = $2 }}
        END {{
            stopped[root] = 1
            for (changed = 1; changed; ) {{
                changed = 0
                for (i = 1; i <= NR; i++) {{
                    if (id[i] in stopped) continue
                    n = split(dependency[i], parts, /[,?]/)
                    for (k = 1; k <= n; k++) {{
                        m = split(parts[k], fields, ":")
                        if (fields[1] != "afterok") continue
                        for (j = 2; j <= m; j++) {{
                            sub(/[(_].*$/, "", fields[j])
                            if (fields[j] in stopped) {{ stopped[id[i]] = 1; changed = 1 }}
                        }}
                    }}
                }}
            }}
            for (i = 1; i <= NR; i++) if (id[i] in stopped) printf "%s ", id[i]
        }}')
    if [ -n "$ids" ]; then
        log "the chain stops here; cancelling the jobs that depend on this one: $ids"
        # shellcheck disable=SC2086
        scancel $ids
    fi
}}

if [ "$status" = 0 ]; then
    log "done: $DESCRIPTION"
    exit 0
fi
# Requeue only a job that was stopped: train.py wrote a checkpoint after a signal (code 3), or
# the signal came before it could (e.g. while it started). Other failures would fail again.
if [ "$status" = "$EXIT_INTERRUPTED" ] || [ -n "$stopped" ]; then
    if [ "$RESTARTS" -ge "$MAX_RESTARTS" ]; then
        log "FAILED: $DESCRIPTION was stopped (train.py exit code $status), but the job was already restarted $RESTARTS times (MAX_RESTARTS); not requeued"
        cancel_dependants
        exit "$status"
    fi
    if [ "$status" = "$EXIT_INTERRUPTED" ]; then
        log "stopped with an in-step checkpoint: exit code $EXIT_INTERRUPTED (srun's 'Exited with exit code $EXIT_INTERRUPTED' above) is the expected stop after a signal, not a failure; requeueing the job (restart $((RESTARTS + 1))), it resumes from the checkpoint"
    else
        log "stopped by SIG$stopped before a checkpoint (train.py exit code $status); requeueing the job (restart $((RESTARTS + 1))), it resumes from its last checkpoint"
    fi
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: submit this script again to resume"
    exit "$status"
fi
failed=$(failed_processes)
log "FAILED: $DESCRIPTION: train.py exited with code $status${{failed:+ (srun: $failed)}}; not requeued (only a job stopped by a signal is)"
cancel_dependants
exit "$status"
"""


def example_specs() -> Dict[str, JobSpec]:
    """The examples beside this file: the paper's protocol (global batch 24) on 8 GPUs."""
    common = dict(cpus_per_task=8, time="24:00:00", mem="200G", signal_seconds=300)
    protocol = ("--dataset voc --task 15-5 --step all --method MiB --batch_size 3 --epochs 30 \\\n"
                "        --lr 0.01 --incremental_lr 0.001 --name MiB")
    return {
        "single_node.sbatch": JobSpec(
            job_name="mib", description="train.py on 1 node x 8 GPUs; its options are the arguments of this script",
            usage=f"Submit from the repository root:\n"
                  f"  sbatch slurm/single_node.sbatch {protocol}",
            nodes=1, tasks_per_node=8, gpus_per_node=8, **common,
        ),
        "multi_node.sbatch": JobSpec(
            job_name="mib", description="train.py on 2 nodes x 4 GPUs; its options are the arguments of this script",
            usage=f"Submit from the repository root (the checkpoint folder must be shared by the nodes):\n"
                  f"  sbatch slurm/multi_node.sbatch {protocol}",
            nodes=2, tasks_per_node=4, gpus_per_node=4, **common,
        ),
    }


def write_examples() -> None:
    for name, spec in example_specs().items():
        (SLURM_DIR / name).write_text(render(spec))


if __name__ == "__main__":
    write_examples()
