"""run_all.sh's Slurm path against a real one-node Slurm (slurm_node.py): the array runs every
selected run, a run frozen mid-task and requeued resumes to the results of an uninterrupted
run, the same command then submits nothing, STATUS=1 counts the runs. Skipped, with the
reason, where Slurm is not installed; where SLURM_TEST_REQUIRED=1 (.ci/run sets it once it has
installed Slurm) that reason fails the test instead, so a green CI means the test ran.

    python -m pytest -q tests/test_slurm.py
"""
import csv
import glob
import os
import signal
import subprocess
import time

import pytest

import slurm_node
from conftest import ROOT, write_fake_mnist

if os.environ.get("SLURM_TEST_REQUIRED") == "1" and slurm_node.missing():
    raise RuntimeError(f"SLURM_TEST_REQUIRED=1, but {slurm_node.missing()}")
pytestmark = pytest.mark.skipif(slurm_node.missing() is not None,
                                reason=str(slurm_node.missing()))
NNS = "fig4-nns-seed1"  # 3 tasks of 200 steps: long enough to stop in task 2
KNOBS = dict(QUICK="1", SEEDS="1", ONLY=f"fig3-permuted-lenet-supsup-entropy|{NNS}",
             SLURM_CPUS="1", SLURM_MEM="1G", SLURM_GPUS="0")


@pytest.fixture
def slurm(tmp_path):
    env = slurm_node.start(tmp_path / "slurm")
    yield env
    slurm_node.stop(tmp_path / "slurm")


def run_all(env, **knobs):
    return subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env={**env, **knobs},
                          capture_output=True, text=True, timeout=300)


def until(done, what, timeout=240):
    began = time.time()
    while not done():
        assert time.time() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def idle(env):
    return not subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                              text=True).stdout.strip()


def state(env, job):
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True,
                          text=True).stdout.strip()


def holder(lock):
    """The process holding a run folder's .lock: the run itself (its bash wrappers do not open
    it)."""
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == lock:
                return int(fd.split("/")[2])
        except OSError:
            continue
    return None


def results(folder):
    with open(os.path.join(folder, "results.csv")) as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def test_an_array_through_run_all_sh_with_a_preempted_run_requeued(tmp_path, slurm):
    knobs = dict(KNOBS, DATA=write_fake_mnist(str(tmp_path / "mnist")),
                 OUT=str(tmp_path / "runs"))
    out = knobs["OUT"]
    submitted = run_all(slurm, SLURM="1", **knobs)
    assert submitted.returncode == 0 and "submitted 2 runs as job array" in submitted.stdout, \
        submitted
    (job_file,) = glob.glob(f"{out}/.slurm/*.job")
    job = open(job_file).read().strip()
    names = [line.split("\t")[0] for line in open(job_file[:-len(".job")])]
    nns = os.path.join(out, NNS)
    until(lambda: os.path.exists(os.path.join(nns, "ckpt.pt")), "task 1 of the NNs run")
    until(lambda: holder(os.path.join(nns, ".lock")), "the NNs run's lock")
    os.kill(holder(os.path.join(nns, ".lock")), signal.SIGSTOP)  # frozen in task 2
    task = f"{job}_{names.index(NNS) + 1}"
    subprocess.run(["scontrol", "requeue", task], env=slurm, check=True)  # as a preemption
    until(lambda: idle(slurm), "the array and its summary job")
    log = open(os.path.join(nns, "log.txt")).read()
    assert "run_nns.py: interrupted after task 1 of 3; rerun the same command to resume" in log
    assert "(restart 1)" in log and f"resuming {nns} after task 1" in log, log
    # the same runs uninterrupted, from the commands the array ran
    listed = run_all(slurm, LIST="1", **dict(knobs, OUT=str(tmp_path / "ref"))).stdout
    for command in listed.splitlines():
        subprocess.run(["bash", "-c", command], cwd=ROOT, env=slurm, check=True,
                       capture_output=True)
    for name in names:
        assert os.path.exists(os.path.join(out, name, ".done"))
        assert results(os.path.join(out, name)) == results(tmp_path / "ref" / name), name
    again = run_all(slurm, SLURM="1", **knobs)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again
    assert glob.glob(f"{out}/.slurm/*.job") == [job_file]
    status = run_all(slurm, STATUS="1", **knobs).stdout
    assert status.strip().endswith("2 runs in " + out + ": 2 done"), status
    assert open(os.path.join(out, "status.txt")).read() == status  # the summary job's
    assert glob.glob(f"{out}/figures/*.png")
