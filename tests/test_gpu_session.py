"""launch/gpu_session.sh: its CPU dry run (every stage at toy size, outputs in $OUT only) and
``launch/bench_train.py --record`` on what it left; a failing stage's summary and exit status, and the
GPU session's time bound and commands."""
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "launch" / "gpu_session.sh"
STAGES = ["device", "kernels", "train_table", "resume_bf16", "resume_fp16", "data"]
STATUS = re.compile(r"(\w+) (ok|failed \(\d+\)|timed out) \d+s")



def run_session(tmp_path: Path, python: Path, dry_run: bool) -> subprocess.CompletedProcess:
    temporary = tmp_path / "tmp"  # the scripts' temporary folders
    temporary.mkdir()
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(python), GPU_SESSION_DRY_RUN=str(int(dry_run)),
               TMPDIR=str(temporary))
    env.pop("GPU_SESSION_STAGES", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def interpreter(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def statuses(summary: str) -> Dict[str, str]:
    return dict(STATUS.findall(summary))


def checkout_state() -> tuple:
    """The file names at the top of the checkout, in launch/ and docs/, and docs/benchmarks.md's digest."""
    names = sorted(str(path.relative_to(REPO_ROOT)) for folder in (REPO_ROOT, REPO_ROOT / "launch", REPO_ROOT / "docs")
                   for path in folder.iterdir() if path.name != "__pycache__")
    return names, hashlib.sha256((REPO_ROOT / "docs" / "benchmarks.md").read_bytes()).hexdigest()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_resume_arguments(line: str, out: Path, amp: str):
    """check_resume.py's options parsed by its own parser, from an interpreter's noted arguments."""
    script, *argv = line.split()
    assert script == "launch/check_resume.py"
    args = load_script("check_resume").parse_args(argv)
    assert (args.amp, args.nproc, args.channels_last, args.dist_backend) == (amp, 2, True, "gloo")
    assert args.output_dir == f"{out}/resume"
    return args


@pytest.mark.slow
def test_dry_run_runs_every_stage_into_out_only_and_is_recorded(tmp_path):
    # check_resume.py's own dry run launches train.py 3 times with 2 ranks, about 90 s per precision on
    # 2 cores (its own test runs it): here a stand-in answers it, and its arguments are checked below.
    resume_calls = tmp_path / "resume_calls.txt"
    python = interpreter(tmp_path / "python", f"""
if [ "$1" = launch/check_resume.py ]; then
    echo "$*" >> {resume_calls}
    echo "resume check ($3, stand-in of tests/test_gpu_session.py): ok"
    exit 0
fi
exec {sys.executable} "$@"
""")
    before = checkout_state()
    result = run_session(tmp_path, python, dry_run=True)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert checkout_state() == before  # in particular docs/benchmarks.md is unchanged

    summary = result.stdout.strip().splitlines()[-1]
    assert summary == (out / "summary.txt").read_text().strip()
    assert summary.startswith("gpu_session: ok (")
    assert statuses(summary) == {stage: "ok" for stage in STAGES}
    for stage in STAGES:
        assert (out / f"{stage}.txt").read_text().startswith(f"+ {python} ")
    assert "device: CPU" in (out / "device.txt").read_text()
    assert "all checks passed" in (out / "kernels.txt").read_text()
    for name in ("run.json", "results.jsonl", "table.md", "profile.txt"):
        assert (out / name).is_file(), name
    assert "cores per GPU for" in (out / "data.txt").read_text()
    for line, amp in zip(resume_calls.read_text().splitlines(), ("bf16", "fp16"), strict=True):
        args = check_resume_arguments(line, out, amp)
        assert args.dry_run and args.device == "cpu"

    docs = tmp_path / "benchmarks.md"
    shutil.copy(REPO_ROOT / "docs" / "benchmarks.md", docs)
    original = docs.read_text()
    load_script("bench_train").main(["--record", str(out), "--docs", str(docs)])
    text = docs.read_text()
    assert text.startswith(original)
    added = text[len(original):]
    assert added.startswith("\n#### GPU session, CPU")
    assert summary in added
    assert "**In-Place ABN kernels** (`python launch/check_norm_kernels.py --quick" in added
    assert "PASS float64 gradcheck" in added
    assert re.search(r"^\| ours-iabn/os16/bf16/cl/step0 \| ours \| iabn \| 16 \| bf16 \| yes \| no \| 0 \| 2 \| [\d.]+ \|",
                     added, re.MULTILINE)
    assert "bf16 = `--amp bf16 --tf32 on`" in added
    for amp in ("bf16", "fp16"):
        assert re.search(rf"^- {amp} \(ok \d+s\): resume check \({amp}, stand-in", added, re.MULTILINE)
    assert "| stage (one worker process) | ms / image | images / s |" in added and "cores per GPU for" in added
    assert "<details><summary>torch.profiler: ours-iabn/os16/bf16/cl/step0" in added


def test_gpu_session_is_bounded_and_a_failing_stage_fails_it_after_the_others(tmp_path):
    # An interpreter that notes its arguments, fails the kernel check and does nothing for the other stages.
    calls = tmp_path / "calls.txt"
    python = interpreter(tmp_path / "python", f"""
echo "$*" >> {calls}
case "$1" in launch/check_norm_kernels.py) echo "kernel check broken"; exit 3 ;; esac
""")
    result = run_session(tmp_path, python, dry_run=False)
    out = tmp_path / "out"

    assert int(re.search(r"at most (\d+) s", result.stdout).group(1)) <= 420
    assert result.returncode == 1
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("gpu_session: FAILED (device ok ")
    assert statuses(summary) == {**{stage: "ok" for stage in STAGES}, "kernels": "failed (3)"}
    assert (out / "summary.txt").read_text().strip() == summary
    assert "kernel check broken" in (out / "kernels.txt").read_text()

    called = calls.read_text().splitlines()
    assert [line.split()[0] for line in called] == [
        "-", "launch/check_norm_kernels.py", "launch/bench_train.py", "launch/check_resume.py",
        "launch/check_resume.py", "launch/bench_data.py"]
    assert called[0] == "- cuda"
    assert "--device cuda" in called[1] and "--device cuda" in called[2]
    for line, amp in zip(called[3:5], ("bf16", "fp16")):
        assert not check_resume_arguments(line, out, amp).dry_run and "--device cuda" in line
    assert called[5].endswith(f"--step_rate_from {out}/results.jsonl")
