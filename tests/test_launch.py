"""launch/*.sh: the dry-run commands, argument validation, `bash -n` and shellcheck.

Nothing here contacts Google Cloud or starts a trainer: every run uses `--dry-run` or fails
validation before any command would run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU_POD = REPO / "launch" / "tpu_pod.sh"
LOCAL = REPO / "launch" / "local_multiprocess.sh"
WORKER_RUN = REPO / "launch" / "_worker_run.sh"
SCRIPTS = (TPU_POD, LOCAL, WORKER_RUN)
_POD_ARGS = [
    "--tpu=my-pod",
    "--zone=us-central2-b",
    "--config=configs/tiny.py",
    "--workdir=/mnt/gcs/run1",
    "--repo=https://github.com/owner/engram_jax",
]


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands, each split the way a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    # -x follows the `source`d launch/_common.sh (paths relative to the repository root).
    result = subprocess.run(
        ["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run_targets_all_workers():
    result = _run(
        TPU_POD,
        *_POD_ARGS,
        "--project=proj",
        "--coordinator_port=8476",
        "--init_timeout=1200",
        "--run_name=r1",
        "--ssh_flag=--internal-ip",
        "--ssh_flag=--tunnel-through-iap",
        "--dry-run",
        "--",
        "--config.num_train_steps=1000",
        "--config.data_path=it's here",
    )
    assert result.returncode == 0, result.stderr
    describe, install, check, launch, stop = _commands(result.stdout)
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert describe[5:8] == ["my-pod", "--zone=us-central2-b", "--project=proj"]
    for ssh in (install, check, launch, stop):
        assert ssh[:8] == [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            "my-pod",
            "--zone=us-central2-b",
            "--project=proj",
        ]
        assert "--worker=all" in ssh
        assert ssh[9:11] == ["--internal-ip", "--tunnel-through-iap"]  # passed through
        assert not any(a.startswith("--worker=") and a != "--worker=all" for a in ssh)

    install_remote = _flag(install, "command")
    assert "git clone -q https://github.com/owner/engram_jax $HOME/engram_jax" in install_remote
    # A venv on each worker (created once), used for every install and run.
    py = "$HOME/engram_jax_venv/bin/python"
    assert f"[ -x {py} ] || python3 -m venv $HOME/engram_jax_venv" in install_remote
    assert f"{py} -m pip install -q -U jax\\[tpu\\]" in install_remote
    assert f"{py} -m pip install -q -e $HOME/engram_jax" in install_remote
    assert install_remote.rstrip().endswith("echo ENGRAM_JAX_INSTALLED worker=$W")

    config_args = [
        "--config=configs/tiny.py",
        "--workdir=/mnt/gcs/run1",
        "--config.mesh.coordinator_address=WORKER0_IP:8476",
        "--config.mesh.initialization_timeout=1200",
        "--config.num_train_steps=1000",
        "--config.data_path=it's here",
    ]
    # Every worker checks the workdir and data with the trainer's own arguments first.
    check_remote = _flag(check, "command")
    checker = shlex.split(check_remote.split("cd $HOME/engram_jax && ", 1)[1].split(" && ")[0])
    assert checker == [py, "-m", "engram_jax.preflight", *config_args]
    assert check_remote.endswith("echo ENGRAM_JAX_CHECKED worker=$W")

    launch_remote = _flag(launch, "command")
    # The remote shell's view of the runner and trainer invocation, up to the redirection.
    runner = shlex.split(launch_remote.split("nohup ", 1)[1].split(" > ", 1)[0])
    # Logs go into the workdir (here a shared path: written directly, nothing to copy).
    assert runner[:5] == [
        "bash",
        "launch/_worker_run.sh",
        "/mnt/gcs/run1/logs/r1.worker$W.log",
        "",
        "--",
    ]
    assert runner[5:] == [py, "-m", "engram_jax.train", "--distributed", *config_args]
    assert "echo ENGRAM_JAX_STARTED worker=$W" in launch_remote
    assert _flag(stop, "command") == "kill $(cat $HOME/engram_jax_logs/r1.pid)"


def test_tpu_pod_dry_run_gs_workdir_resume_and_python():
    args = [a for a in _POD_ARGS if not a.startswith("--workdir")]
    result = _run(
        TPU_POD,
        *args,
        "--workdir=gs://bucket/runs/r2",
        "--num_workers=2",
        "--python=/usr/bin/python3.11",
        "--resume",
        "--run_name=r2",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "resuming r2 from its latest checkpoint" in result.stdout
    install, check, launch, _ = _commands(result.stdout)
    install_remote = _flag(install, "command")
    assert "venv" not in install_remote
    assert "/usr/bin/python3.11 -m pip install -q -e $HOME/engram_jax" in install_remote
    check_remote = _flag(check, "command")
    # A resume refuses to start beside a trainer of the same run and needs a checkpoint.
    assert "kill -0 $(cat $HOME/engram_jax_logs/r2.pid)" in check_remote
    assert "--require_checkpoint" in check_remote
    runner = shlex.split(_flag(launch, "command").split("nohup ", 1)[1].split(" > ", 1)[0])
    # With a bucket, the log is written on the worker and copied into the workdir.
    assert runner[2:5] == [
        "$HOME/engram_jax_logs/r2.worker$W.log",
        "gs://bucket/runs/r2/logs/r2.worker$W.log",
        "--",
    ]
    assert runner[5] == "/usr/bin/python3.11"
    result = _run(TPU_POD, *args, "--workdir=gs://bucket/r", "--resume", "--dry-run")
    assert result.returncode == 2 and "--resume needs the --run_name" in result.stderr


def test_worker_run_logs_appends_and_forwards_status(tmp_path):
    log = tmp_path / "logs" / "w0.log"
    for word in ("first", "second"):
        result = subprocess.run(
            ["bash", str(WORKER_RUN), str(log), "", "--", "sh", "-c", f"echo {word}; exit 3"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "ENGRAM_JAX_LOG_COPY_SECONDS": "0.1"},
        )
        assert result.returncode == 3
    lines = log.read_text().splitlines()
    assert lines[0] == "first" and lines[2] == "second"
    assert lines[1].endswith("trainer exited with status 3") and lines[3].endswith("status 3")


def test_tpu_pod_dry_run_options():
    result = _run(
        TPU_POD, *_POD_ARGS, "--num_workers=4", "--skip_install", "--jax=none", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    # Worker count given and no coordinator port: no describe, no install; check, start, stop.
    assert len(commands) == 3
    launch_remote = _flag(commands[1], "command")
    assert "coordinator_address" not in launch_remote
    result = _run(TPU_POD, *_POD_ARGS, "--num_workers=4", "--jax=none", "--dry-run")
    assert "pip install -q -U" not in result.stdout
    assert "pip install -q -e" in result.stdout
    # Without --skip_check every worker is checked before the start.
    assert "engram_jax.preflight" in result.stdout
    result = _run(TPU_POD, *_POD_ARGS, "--num_workers=4", "--skip_check", "--dry-run")
    assert "engram_jax.preflight" not in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--tpu": None}, "--tpu=NAME is required"),
        ({"--zone": None}, "--zone=ZONE is required"),
        ({"--zone": "central"}, "--zone: got 'central'"),
        ({"--config": "configs/missing.py"}, "does not exist"),
        ({"--workdir": "run1"}, "expected gs://BUCKET/PATH or an absolute path"),
        ({"--workdir": "s3://bucket/run"}, "expected gs://BUCKET/PATH or an absolute path"),
        ({"--coordinator_port": "99999"}, "--coordinator_port: got '99999'"),
        ({"--init_timeout": "soon"}, "--init_timeout: got 'soon'"),
        ({"--bogus": "1"}, "unknown argument '--bogus=1'"),
    ],
)
def test_tpu_pod_usage_errors(change, message):
    args = dict(a.split("=", 1) for a in _POD_ARGS)
    for key, value in change.items():
        if value is None:
            del args[key]
        else:
            args[key] = value
    result = _run(TPU_POD, *(f"{k}={v}" for k, v in args.items()), "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr
    assert "--help" in result.stderr
    assert result.stdout == ""


def test_tpu_pod_rejects_overrides_it_owns():
    result = _run(TPU_POD, *_POD_ARGS, "--dry-run", "--", "--workdir=gs://other")
    assert result.returncode == 2
    assert "set by this script" in result.stderr


def test_local_multiprocess_dry_run():
    result = _run(
        LOCAL,
        "--num_processes=3",
        "--config=configs/tiny.py",
        "--workdir=/tmp/engram_mp",
        "--port=23456",
        "--devices_per_process=2",
        "--init_timeout=60",
        "--python=/opt/py/bin/python",
        "--dry-run",
        "--",
        "--config.num_train_steps=4",
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert len(commands) == 3
    for index, argv in enumerate(commands):
        assert argv[0] == "env"
        env = dict(a.split("=", 1) for a in argv[1:4])
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
        assert argv[4:] == [
            "/opt/py/bin/python",
            "-m",
            "engram_jax.train",
            "--config=configs/tiny.py",
            "--workdir=/tmp/engram_mp",
            "--num_processes=3",
            f"--process_id={index}",
            "--config.mesh.coordinator_address=localhost:23456",
            "--config.mesh.initialization_timeout=60",
            "--config.num_train_steps=4",
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/tiny.py", "--workdir=/tmp/x"], "--num_processes=N is required"),
        (
            ["--num_processes=0", "--config=configs/tiny.py", "--workdir=/tmp/x"],
            "--num_processes: got '0'",
        ),
        (["--num_processes=2", "--config=nope.py", "--workdir=/tmp/x"], "is not a file"),
        (
            ["--num_processes=2", "--config=configs/tiny.py", "--workdir=gs://b/x"],
            "expected a local directory",
        ),
        (
            ["--num_processes=2", "--config=configs/tiny.py", "--workdir=/tmp/x", "--port=0"],
            "--port: got '0'",
        ),
    ],
)
def test_local_multiprocess_usage_errors(args, message):
    result = _run(LOCAL, *args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("script", (TPU_POD, LOCAL), ids=lambda p: p.name)
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ")


def test_preflight_checks_workdir_data_and_checkpoint(tmp_path):
    """What every pod worker runs before the start (launch/tpu_pod.sh's check step)."""
    from engram_jax import config as config_lib
    from engram_jax import preflight

    config = config_lib.base_config()
    workdir = tmp_path / "run"
    assert preflight.check(config, str(workdir)) == "data_files=1 latest_checkpoint=none"
    assert workdir.is_dir() and not list(workdir.iterdir())  # the write probe is gone
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        preflight.check(config, str(workdir), require_checkpoint=True)
    (workdir / "checkpoints" / "40").mkdir(parents=True)
    assert preflight.check(config, str(workdir), require_checkpoint=True).endswith("=40")
    config.data_path = str(tmp_path / "nowhere" / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        preflight.check(config, str(workdir))
    config.data_path = ""
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(OSError, match="not writable"):
            preflight.check(config, str(tmp_path / "ro"))
