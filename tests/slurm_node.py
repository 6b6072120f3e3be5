"""A private one-node Slurm in a folder, for the tests of run_all.sh's Slurm path: munged,
slurmctld and slurmd with their key, sockets, state, logs and free ports under the folder,
stopped by their process ids. Needs root and Debian's slurm-wlm and munge.

    python tests/slurm_node.py start DIR   # prints the SLURM_CONF to export, then
    python tests/slurm_node.py stop DIR
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "mungekey", "sbatch")


def missing():
    """Why a Slurm cannot start here (None if it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found: apt-get install " \
               "slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd needs root"
    return None


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start(folder):
    """Start the node; -> the environment for its clients (SLURM_CONF)."""
    folder = os.path.abspath(folder)
    for sub in ("munge", "state", "spool", "log"):
        os.makedirs(os.path.join(folder, sub), mode=0o700, exist_ok=True)
    key, sock = os.path.join(folder, "munge", "key"), os.path.join(folder, "munge", "socket")
    subprocess.run(["mungekey", "--create", "--keyfile", key, "--force"], check=True,
                   capture_output=True)
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={folder}/munge/pid", f"--log-file={folder}/log/munged.log",
                    f"--seed-file={folder}/munge/seed"], check=True, capture_output=True)
    host = socket.gethostname().split(".")[0]
    ctld_port, d_port = free_ports(2)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 1024
    conf = os.path.join(folder, "slurm.conf")
    with open(conf, "w") as f:
        f.write(f"""ClusterName=test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=10
MinJobAge=600
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=conf)
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env, capture_output=True)
    subprocess.run(["slurmd", "-f", conf], check=True, env=env, capture_output=True)
    for _ in range(150):  # the node comes up idle within seconds
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                               text=True).stdout.strip()
        if state == "idle":
            return env
        time.sleep(0.2)
    stop(folder)
    raise RuntimeError(f"the Slurm node did not come up (sinfo: {state!r}; logs in {folder}/log)")


def stop(folder):
    """Stop the daemons that start() started, by the process ids in their pid files."""
    folder = os.path.abspath(folder)
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/pid"):
        try:
            pid = int(open(os.path.join(folder, pid_file)).read())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.05)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        print(f"export SLURM_CONF={start(sys.argv[2])['SLURM_CONF']}")
    else:
        stop(sys.argv[2])
