"""SLURM: the sbatch file of ./manage.py slurm-script, the allocation check, requeue and resume.

The fast tests fake a SLURM task's environment in this process. The ``slurm_cluster`` tests run
real srun / sbatch jobs on the one-node cluster of shared/slurm (started here if it is not running).
"""

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tests.conftest import ROOT, run_cli, run_script, tiny_args, write_corpus
from tests.test_cli import scalars
from xlab.manage_cli import main as manage

SHARED_DIRS = (ROOT.parent / "shared", ROOT / "shared")  # CI clones the repository with shared/ beside it
DEFAULTS = str(ROOT / "conf" / "defaults.yaml")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class RankReport(Callback):
    """Test helper: each rank writes ``rankN.json`` with its world size, cluster environment and own losses."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "global_step": trainer.global_step,
            "losses": self.losses,
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class SignalAt(Callback):
    """Test helper: sends this process SLURM's requeue signal once ``global_step`` reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class Pace(Callback):
    """Test helper: slows training steps, so that a signal sent from outside finds the run training."""

    def __init__(self, seconds: float = 0.3):
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.seconds)


def dry_run(capsys: pytest.CaptureFixture, *args: str) -> tuple[dict[str, str], list[str], str]:
    """``slurm-script --dry-run``, parsed back: the #SBATCH options, the srun command, the sbatch command."""
    assert manage(["slurm-script", "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    options = dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in lines if line.startswith("#SBATCH"))
    (srun,) = (shlex.split(line) for line in lines if line.startswith("srun "))
    assert lines[0] == "#!/bin/bash"
    return options, srun, lines[-1]


def test_dry_run_prints_a_script_that_matches_the_options(in_tmp: Path, capsys):
    options, srun, submit = dry_run(
        capsys, "-c", DEFAULTS, "--nodes", "2", "--gpus-per-node", "4", "--time", "1-02:30", "--partition", "gpu",
        "--", "--trainer.max_steps=7", "--trainer.logger.init_args.name=big run",
    )  # fmt: skip
    assert options == {
        "job-name": "defaults",
        "nodes": "2",
        "ntasks-per-node": "4",
        "gpus-per-node": "4",
        "time": "1-02:30",
        "partition": "gpu",
        "signal": "SIGUSR1@90",
        "requeue": "",
        "open-mode": "append",
        "chdir": str(in_tmp),
        "output": "slurm/%x-%j.out",
        "error": "slurm/%x-%j.err",
    }
    assert srun[:4] == ["srun", sys.executable, str(ROOT / "xlab.py"), "fit"]
    assert srun[4:] == [
        "-c", DEFAULTS,
        "--trainer.num_nodes=2", "--trainer.devices=4", "--trainer.accelerator=gpu",
        "--trainer.max_steps=7", "--trainer.logger.init_args.name=big run",
    ]  # fmt: skip
    assert submit == "sbatch slurm/defaults.sbatch"
    assert list(in_tmp.iterdir()) == []


def test_cpu_tasks_per_node_and_a_config_named_bash(in_tmp: Path, capsys):
    (in_tmp / "bash.yaml").write_text("trainer:\n  max_steps: 3\n")
    options, srun, submit = dry_run(capsys, "-c", "bash.yaml", "--tasks-per-node", "2")
    assert options["job-name"] == "xlab-bash"  # Lightning ignores SLURM in a job named bash
    assert options["ntasks-per-node"] == "2" and options["nodes"] == "1" and "gpus-per-node" not in options
    assert "time" not in options and "partition" not in options
    assert srun[-3:] == ["--trainer.num_nodes=1", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    assert submit == "sbatch slurm/xlab-bash.sbatch"


def test_no_submit_writes_the_file_once_and_force_replaces_it(in_tmp: Path, capsys):
    args = ["slurm-script", "-c", DEFAULTS, "--job-name", "tiny", "--no-submit"]
    assert manage(args) == 0
    script = in_tmp / "slurm" / "tiny.sbatch"
    assert capsys.readouterr().out.strip() == "wrote slurm/tiny.sbatch; submit it with: sbatch slurm/tiny.sbatch"
    assert "#SBATCH --job-name=tiny\n" in script.read_text()
    assert manage([*args, "--nodes", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: slurm/tiny.sbatch already exists: --force replaces it"
    assert manage([*args, "--nodes", "3", "--force"]) == 0
    assert "#SBATCH --nodes=3\n" in script.read_text()
    assert sorted(p.name for p in (in_tmp / "slurm").iterdir()) == ["tiny.sbatch"]


def test_submitting_without_sbatch_is_one_line_and_writes_nothing(in_tmp: Path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(in_tmp / "empty"))
    assert manage(["slurm-script", "-c", DEFAULTS]) == 2
    assert capsys.readouterr().err.strip().startswith("error: sbatch is not on PATH")
    assert list(in_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be 0 (CPU) or more, got -1"),
        (["--tasks-per-node", "0"], "--tasks-per-node must be at least 1, got 0"),
        (["--gpus-per-node", "2", "--tasks-per-node", "4"], "Lightning runs one task per GPU"),
        (["--time", "1-2-3"], "--time '1-2-3' is not a SLURM time limit: use MM, MM:SS, HH:MM:SS, D-HH"),
        (["--time", "2h"], "--time '2h' is not a SLURM time limit"),
        (["--partition", "a b"], "--partition 'a b' is not a partition name"),
        (["--job-name", "bash"], "turns off Lightning's SLURM support"),
        (["--job-name", "a/b"], "--job-name 'a/b' may hold only"),
        (["-c", "missing.yaml"], "config file missing.yaml does not exist"),
        (["--", "--trainer.devices=3"], "--trainer.devices=3 is set by --nodes, --gpus-per-node and --tasks-per-node"),
    ],
)
def test_options_sbatch_would_reject_are_one_clear_line(in_tmp: Path, capsys, args: list[str], message: str):
    assert manage(["slurm-script", "--dry-run", "-c", DEFAULTS, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("limit", ["30", "30:15", "2:00:00", "1-12", "1-12:30", "1-12:30:15", "UNLIMITED"])
def test_every_time_format_sbatch_takes_is_accepted(in_tmp: Path, capsys, limit: str):
    options, _, _ = dry_run(capsys, "-c", DEFAULTS, "--time", limit)
    assert options["time"] == limit


def fake_slurm_task(monkeypatch: pytest.MonkeyPatch, tasks_per_node: int = 1, nodes: int = 1, **extra: str) -> None:
    """The variables srun gives a task (rank 0), so that Lightning picks its SLURMEnvironment."""
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    variables = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "xlab-test",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(tasks_per_node * nodes),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        **extra,
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("tasks_per_node", "nodes", "unset", "overrides", "message"),
    [
        (2, 1, None, [], "SLURM started 2 task(s) per node on 1 node(s), but trainer.devices=auto, "),
        (2, 1, None, ["--trainer.devices=3"], "set --trainer.devices=2 --trainer.num_nodes=1 (one process per task)"),
        (
            1,
            2,
            None,
            [],
            "but trainer.devices=auto, trainer.num_nodes=1: set --trainer.devices=1 --trainer.num_nodes=2",
        ),
        (2, 1, "SLURM_STEP_ID", ["--trainer.devices=2"], "allocation has 2 tasks: start the run with srun"),
        (2, 1, "SLURM_NTASKS_PER_NODE", ["--trainer.devices=2"], "without --ntasks-per-node, which Lightning needs"),
    ],
)
def test_allocation_mismatch_is_one_line_before_any_work(
    in_tmp: Path, corpus: Path, capsys, monkeypatch, tasks_per_node, nodes, unset, overrides, message
):
    fake_slurm_task(monkeypatch, tasks_per_node, nodes)
    if unset:
        monkeypatch.delenv(unset)
    assert run_cli("fit", *tiny_args(corpus, "--trainer.accelerator=cpu", *overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (in_tmp / "runs").exists() and not (in_tmp / "cache").exists()


def losses_per_run(run_dir: Path) -> list[list[tuple[int, float]]]:
    """``train/loss`` of each process that wrote to the run, one event file each, in the order they ran."""
    files = sorted(run_dir.glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime)
    return [scalars(file)["train/loss"] for file in files]


def fake_scontrol(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``scontrol`` first on PATH that only records its arguments."""
    calls = directory / "scontrol.calls"
    script = directory / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_signal_saves_stops_requeues_and_the_restart_resumes(in_tmp: Path, corpus: Path, monkeypatch):
    """SIGUSR1 in a SLURM task: stop after the step, save last.ckpt, scontrol requeue; the job's restart
    (SLURM_RESTART_COUNT=1, same command) resumes from it and logs every step exactly once."""
    args = tiny_args(corpus, "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=100")
    assert run_cli("fit", *args, "--trainer.logger.init_args.name=straight") == 0
    straight = scalars(in_tmp / "runs" / "straight")["train/loss"]
    fake_slurm_task(monkeypatch)
    calls = fake_scontrol(in_tmp, monkeypatch)
    signal_at = ["--trainer.callbacks+=tests.test_slurm.SignalAt", "--trainer.callbacks.step=4"]
    assert run_cli("fit", *args, *signal_at) == 0
    checkpoints = in_tmp / "runs" / "defaults" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4
    assert calls.read_text() == "requeue 4242\n"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_cli("fit", *args) == 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 10
    assert calls.read_text() == "requeue 4242\n"
    first, second = losses_per_run(in_tmp / "runs" / "defaults")
    assert [step for step, _ in first] == [0, 1, 2, 3]
    assert [step for step, _ in second] == [4, 5, 6, 7, 8, 9]
    # The curve goes on where it was (an uninterrupted run's, up to the data order after the stop), not from the start.
    assert all(abs(loss - straight[step][1]) < 0.1 for step, loss in second), (second, straight)


def test_a_new_job_still_refuses_an_earlier_runs_checkpoints(in_tmp: Path, corpus: Path, capsys, monkeypatch):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=3")) == 0
    fake_slurm_task(monkeypatch, SLURM_RESTART_COUNT="0")
    assert run_cli("fit", *tiny_args(corpus)) == 2
    assert "already holds checkpoints: resume with --ckpt_path last" in capsys.readouterr().err


# ---------------------------------------------------------------- on a real cluster


def start_script() -> Path | None:
    scripts = (directory / "slurm" / "start-local-cluster" for directory in SHARED_DIRS)
    return next((script for script in scripts if script.is_file()), None)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """Start shared/slurm's one-node cluster (a no-op when it runs); SLURM_CONF is set for every client."""
    script = start_script()
    if script is None:
        pytest.skip(f"no shared/slurm/start-local-cluster in {' or '.join(map(str, SHARED_DIRS))}")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    started = subprocess.run([str(script)], capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, started.stderr
    conf = started.stdout.strip().removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


def run(*command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def xlab_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "xlab.py"), "fit", *args]


@pytest.mark.parametrize("strategy", [[], ["-c", str(ROOT / "conf" / "fsdp.yaml")]], ids=["ddp", "fsdp"])
def test_srun_fit_on_two_tasks(slurm_cluster: str, tmp_path: Path, strategy: list[str]):
    """DDP, and FSDP2 through the same overlay as on one machine: srun's tasks are the processes."""
    corpus = write_corpus(tmp_path / "corpus")
    report = ["--trainer.callbacks+=tests.test_slurm.RankReport", f"--trainer.callbacks.directory={tmp_path}"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1", *report]
    srun = ["srun", "-N1", "--ntasks-per-node=2", "-J", "xlab-ddp"]
    result = run(*srun, *xlab_command(*strategy, *tiny_args(corpus, *ddp)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, seen in enumerate(ranks):
        assert seen["rank"] == rank and seen["world_size"] == 2 and seen["environment"] == "SLURMEnvironment"
        assert seen["global_step"] == 10 and len(seen["losses"]) == 10
        assert all(math.isfinite(loss) for loss in seen["losses"])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own shard of the batches
    checkpoint = tmp_path / "runs" / "defaults" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 10


def test_srun_with_other_devices_than_tasks_fails_before_work(slurm_cluster: str, tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    command = xlab_command(*tiny_args(corpus, "--trainer.accelerator=cpu", "--trainer.devices=1"))
    result = run("srun", "-N1", "--ntasks-per-node=2", "-J", "xlab-mismatch", *command, cwd=tmp_path)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("error:")}
    assert errors == {
        "error: SLURM started 2 task(s) per node on 1 node(s), but trainer.devices=1, trainer.num_nodes=1: "
        "set --trainer.devices=2 --trainer.num_nodes=1 (one process per task), "
        "or change srun's --ntasks-per-node / --nodes"
    }, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def job_fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def requeued_and_pending(job_id: str) -> bool:
    fields = job_fields(job_id)
    return fields["Restarts"] == "1" and fields["JobState"] == "PENDING"


def logged_steps(run_dir: Path) -> int:
    """The last step with a ``train/loss`` in the run so far, -1 before there is one."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return -1
    return max((step for step, _ in scalars(run_dir).get("train/loss", [])), default=-1)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_sbatch_job_requeued_by_usr1_resumes_from_its_saved_step(slurm_cluster: str, tmp_path: Path):
    """The generated script, submitted; USR1 to its tasks; SLURM restarts it and the second run continues
    the same run from the saved step. SLURM holds a requeued job back by a fixed begin-time delay (about 2
    minutes); the test releases it at once (``StartTime=now``) once it is pending again, which changes
    when the restart runs, not what it does."""
    corpus = write_corpus(tmp_path / "corpus")
    pace = ["--trainer.callbacks+=tests.test_slurm.Pace", "--trainer.log_every_n_steps=1"]
    overrides = tiny_args(corpus, *pace, "--trainer.max_steps=40", "--trainer.val_check_interval=20")
    submitted = run_script(
        "manage.py", "slurm-script", "-c", DEFAULTS, "--tasks-per-node", "2", "--job-name", "xlab-requeue",
        "--time", "10", "--", *overrides, cwd=tmp_path,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.match(r"submitted batch job (\d+): slurm/xlab-requeue.sbatch", submitted.stdout).group(1)
    try:
        run_dir = tmp_path / "runs" / "defaults"
        wait_until(lambda: logged_steps(run_dir) >= 4, 180, "the first run to log 5 steps")
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        wait_until(lambda: requeued_and_pending(job_id), 180, "the job to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        wait_until(lambda: job_fields(job_id)["JobState"] in FINISHED, 400, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    fields = job_fields(job_id)
    output = (tmp_path / "slurm" / f"xlab-requeue-{job_id}.out").read_text()
    errors = (tmp_path / "slurm" / f"xlab-requeue-{job_id}.err").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, output, errors[-3000:])

    saved_step = int(re.search(rf"requeued SLURM job {job_id} at step (\d+)", output + errors).group(1))
    assert f"job {job_id} on" in output and ", restart 0" in output and ", restart 1" in output
    assert f"SLURM job {job_id} restart 1: resuming from" in output + errors
    first, second = losses_per_run(run_dir)
    assert [step for step, _ in first] == list(range(saved_step))
    assert [step for step, _ in second] == list(range(saved_step, 40))
    assert abs(second[0][1] - first[-1][1]) < abs(second[0][1] - first[0][1])  # no restart of the loss curve
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 40
