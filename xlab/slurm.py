"""SLURM: write the sbatch file of a training run, check the allocation at start, requeue on the warning signal.

Lightning's ``SLURMEnvironment`` takes ranks, world size and the main address from ``srun``'s
variables as it is. What XLab adds is around it:

- ``Job``: the options of ``./manage.py slurm-script``, checked the way sbatch would check them,
  and the script they make.
- ``check_allocation``: a run whose ``trainer.num_nodes`` / ``trainer.devices`` disagree with the
  tasks srun started stops with one line before anything is built.
- ``RequeueOnSignal``: SLURM's ``SIGUSR1`` ends training at the next step boundary (all ranks at
  the same step), leaves ``last.ckpt`` in the run's checkpoint directory and requeues the job;
  ``requeued_checkpoint`` makes the restarted job resume from it, in the same run directory.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from xlab.callbacks import SaveOnSignal
from xlab.errors import UserError
from xlab.files import write_atomic
from xlab.loop import last_checkpoint_path

XLAB = Path(__file__).resolve().parent.parent / "xlab.py"
LOG_DIR = Path("slurm")
REQUEUE_SIGNAL = signal.SIGUSR1
WARNING_SECONDS = 90  # how long before the time limit SLURM sends REQUEUE_SIGNAL
RESERVED_JOB_NAMES = ("bash", "interactive")  # Lightning turns its SLURM support off for these
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|infinite|unlimited", re.IGNORECASE)
_NAME = re.compile(r"[\w.-]+", re.ASCII)
_PARTITIONS = re.compile(r"[\w.-]+(,[\w.-]+)*", re.ASCII)
_SET_BY_OPTIONS = ("--trainer.num_nodes", "--trainer.devices", "--trainer.accelerator")


@dataclass(frozen=True)
class Job:
    """One training run on ``nodes`` x ``tasks_per_node`` processes: what sbatch is asked for and what srun runs.

    ``gpus_per_node`` 0 runs on CPUs, ``tasks_per_node`` processes per node (default 1); with GPUs
    there is one process per GPU, as Lightning expects.
    """

    configs: tuple[Path, ...]
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    name: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.configs:
            raise UserError("name the run's config with -c FILE")
        for config in self.configs:
            if not config.is_file():
                raise UserError(f"config file {config} does not exist")
        if self.nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be 0 (CPU) or more, got {self.gpus_per_node}")
        if self.tasks_per_node is not None:
            _check_tasks(self.tasks_per_node, self.gpus_per_node)
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise UserError(f"--time {self.time!r} is not a SLURM time limit: use {TIME_FORMATS}")
        if self.partition is not None and not _PARTITIONS.fullmatch(self.partition):
            raise UserError(f"--partition {self.partition!r} is not a partition name (or a comma-separated list)")
        if self.name is not None:
            _check_job_name(self.name)
        for override in self.overrides:
            if override.startswith(_SET_BY_OPTIONS):
                raise UserError(f"{override} is set by --nodes, --gpus-per-node and --tasks-per-node, not after --")

    @property
    def devices(self) -> int:
        """Processes per node: ``trainer.devices`` and srun's ``--ntasks-per-node``."""
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def job_name(self) -> str:
        """``name``, or the last config's file name without suffix (``xlab-`` before a name Lightning reserves)."""
        if self.name is not None:
            return self.name
        stem = re.sub(r"[^\w.-]", "-", self.configs[-1].stem, flags=re.ASCII)
        return f"xlab-{stem}" if stem in RESERVED_JOB_NAMES else stem

    def default_path(self) -> Path:
        return LOG_DIR / f"{self.job_name}.sbatch"

    def command(self) -> list[str]:
        """What every task runs: this interpreter (so its virtual environment), ``xlab.py fit``, shape, overrides."""
        configs = [argument for config in self.configs for argument in ("-c", str(config))]
        shape = [
            f"--trainer.num_nodes={self.nodes}",
            f"--trainer.devices={self.devices}",
            f"--trainer.accelerator={'gpu' if self.gpus_per_node else 'cpu'}",
        ]
        return [sys.executable, str(XLAB), "fit", *configs, *shape, *self.overrides]

    def directives(self, workdir: Path) -> list[str]:
        """The ``#SBATCH`` options; logs go to ``slurm/JOB_NAME-JOB_ID.out`` and ``.err`` under ``workdir``."""
        optional = {"gpus-per-node": self.gpus_per_node or None, "time": self.time, "partition": self.partition}
        return [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.devices}",
            *(f"--{key}={value}" for key, value in optional.items() if value is not None),
            f"--signal={REQUEUE_SIGNAL.name}@{WARNING_SECONDS}",
            "--requeue",
            "--open-mode=append",
            f"--chdir={shlex.quote(str(workdir))}",
            f"--output={LOG_DIR}/%x-%j.out",
            f"--error={LOG_DIR}/%x-%j.err",
        ]

    def script(self, workdir: Path) -> str:
        """The sbatch file: run from ``workdir`` (relative configs and ``runs/`` resolve there), the same
        command after a requeue (the run resumes from its ``last.ckpt`` by itself)."""
        lines = [
            "#!/bin/bash",
            *(f"#SBATCH {directive}" for directive in self.directives(workdir)),
            f"# Written by ./manage.py slurm-script. {REQUEUE_SIGNAL.name} {WARNING_SECONDS} s before the time limit",
            "# saves the run's last.ckpt and requeues the job; the restarted job resumes from it.",
            'echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
            "srun " + shlex.join(self.command()),
        ]
        return "\n".join(lines) + "\n"


def _check_tasks(tasks_per_node: int, gpus_per_node: int) -> None:
    if tasks_per_node < 1:
        raise UserError(f"--tasks-per-node must be at least 1, got {tasks_per_node}")
    if gpus_per_node and tasks_per_node != gpus_per_node:
        raise UserError(
            f"--tasks-per-node {tasks_per_node} differs from --gpus-per-node {gpus_per_node}: "
            "Lightning runs one task per GPU"
        )


def _check_job_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UserError(f"--job-name {name!r} may hold only letters, digits, '.', '_' and '-'")
    if name in RESERVED_JOB_NAMES:
        raise UserError(f"--job-name {name!r} turns off Lightning's SLURM support: choose another name")


def write_script(path: Path, script: str, force: bool) -> None:
    """Write the sbatch file atomically and make the log directory SLURM writes into (it creates none)."""
    if path.exists() and not force:
        raise UserError(f"{path} already exists: --force replaces it")
    LOG_DIR.mkdir(exist_ok=True)
    write_atomic(path, script.encode())


def sbatch() -> str:
    """The sbatch executable, looked for before anything is written."""
    found = shutil.which("sbatch")
    if found is None:
        raise UserError("sbatch is not on PATH: submit from a SLURM login node, or write the file with --no-submit")
    return found


def submit(executable: str, path: Path) -> str:
    """Submit ``path``; returns the job id."""
    result = subprocess.run([executable, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise UserError(f"sbatch {path} failed (the file is kept): {reason}")
    return result.stdout.strip().split(";")[0]


def in_slurm_job() -> bool:
    """Whether Lightning takes the ranks from srun: ``SLURMEnvironment.detect()``'s rule (and TorchElastic
    first, as Lightning picks it), without the warning it prints when srun is merely installed."""
    if TorchElasticEnvironment.detect() or "SLURM_NTASKS" not in os.environ:
        return False
    return os.environ.get("SLURM_JOB_NAME") not in RESERVED_JOB_NAMES


def check_allocation(num_nodes: int, devices: Any, accelerator: Any) -> None:
    """Under SLURM, refuse a run whose processes would not match the tasks srun started.

    Lightning checks this too, but only deep inside the Trainer, and a plain ``python`` inside a
    multi-task allocation (no srun) would wait forever for ranks that never come.
    """
    if not in_slurm_job():
        return
    tasks = int(os.environ["SLURM_NTASKS"])
    if tasks > 1 and "SLURM_STEP_ID" not in os.environ:
        raise UserError(f"this SLURM allocation has {tasks} tasks: start the run with srun, one process per task")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is None and tasks > 1:
        raise UserError(
            f"srun started {tasks} tasks without --ntasks-per-node, which Lightning needs: "
            "use srun --ntasks-per-node=DEVICES"
        )
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    allocated = int(per_node) if per_node and per_node.isdigit() else 1
    configured = _configured_devices(devices, accelerator)
    if nodes != num_nodes or configured not in (None, allocated):
        raise UserError(
            f"SLURM started {allocated} task(s) per node on {nodes} node(s), but trainer.devices={devices}, "
            f"trainer.num_nodes={num_nodes}: set --trainer.devices={allocated} --trainer.num_nodes={nodes} "
            "(one process per task), or change srun's --ntasks-per-node / --nodes"
        )


def _configured_devices(devices: Any, accelerator: Any) -> int | None:
    """Processes per node the Trainer will start for ``devices``, or None where only Lightning can tell."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([index for index in text.split(",") if index.strip()])
    if text.isdigit():
        return int(text)
    if text not in ("auto", "-1"):
        return None
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1 if accelerator in ("auto", "cpu") else None


def requeued_checkpoint(trainer: Trainer) -> Path | None:
    """The run's ``last.ckpt`` when this is a requeued SLURM job: the state its previous run left.

    It is newer than any ``ckpt_path`` the job was submitted with, which named where the job began.
    """
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    checkpoint = last_checkpoint_path(trainer)
    if restarts < 1 or not checkpoint.is_file():
        return None
    rank_zero_info(f"SLURM job {os.environ.get('SLURM_JOB_ID')} restart {restarts}: resuming from {checkpoint}")
    return checkpoint


class RequeueOnSignal(SaveOnSignal):
    """Under SLURM, ``SIGUSR1`` (``--signal=SIGUSR1@90``) ends training after the current step on every
    rank, saves ``last.ckpt`` and, once the loggers are closed, requeues the job.

    It replaces Lightning's own handler, which saves at whatever point the signal lands (inside a
    step, or a collective under DDP) and lets training go on until SLURM kills it, logging steps the
    restarted job then logs again. Installed before Lightning's, it leaves Lightning's alone.
    """

    signum = REQUEUE_SIGNAL

    def active(self) -> bool:
        return in_slurm_job()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.saved_to is not None and trainer.is_global_zero:
            requeue(f"step {trainer.global_step} saved to {self.saved_to}")


def requeue(progress: str) -> None:
    """``scontrol requeue`` this job (array task included); SLURM then ends it and starts it again later."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        rank_zero_info(f"requeued SLURM job {job} at {progress}; the restarted job resumes from it")
    else:
        rank_zero_warn(
            f"scontrol requeue {job} failed ({result.stderr.strip()}); {progress}: resume with --ckpt_path last"
        )
