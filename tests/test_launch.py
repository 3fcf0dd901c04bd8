"""launch/*.sh: the dry-run commands, argument validation, `bash -n` and shellcheck.

Nothing here contacts Google Cloud or starts a trainer: every run uses `--dry-run` or fails
validation before any command would run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU_POD = REPO / "launch" / "tpu_pod.sh"
LOCAL = REPO / "launch" / "local_multiprocess.sh"
SCRIPTS = (TPU_POD, LOCAL)
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
        "--dry-run",
        "--",
        "--config.num_train_steps=1000",
        "--config.data_path=it's here",
    )
    assert result.returncode == 0, result.stderr
    describe, install, launch, stop = _commands(result.stdout)
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert describe[5:8] == ["my-pod", "--zone=us-central2-b", "--project=proj"]
    for ssh in (install, launch, stop):
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
        assert not any(a.startswith("--worker=") and a != "--worker=all" for a in ssh)

    install_remote = _flag(install, "command")
    assert "git clone -q https://github.com/owner/engram_jax $HOME/engram_jax" in install_remote
    assert "pip install -q -U jax\\[tpu\\]" in install_remote
    assert "pip install -q -e $HOME/engram_jax" in install_remote
    assert install_remote.rstrip().endswith("echo ENGRAM_JAX_INSTALLED worker=$W")

    launch_remote = _flag(launch, "command")
    # The remote shell's view of the trainer invocation, up to the log redirection.
    trainer = shlex.split(launch_remote.split("nohup ", 1)[1].split(" > ", 1)[0])
    assert trainer == [
        "python3",
        "-m",
        "engram_jax.train",
        "--distributed",
        "--config=configs/tiny.py",
        "--workdir=/mnt/gcs/run1",
        "--config.mesh.coordinator_address=WORKER0_IP:8476",
        "--config.mesh.initialization_timeout=1200",
        "--config.num_train_steps=1000",
        "--config.data_path=it's here",
    ]
    assert "$HOME/engram_jax_logs/r1.worker$W.log" in launch_remote
    assert "echo ENGRAM_JAX_STARTED worker=$W" in launch_remote
    assert _flag(stop, "command") == "kill $(cat $HOME/engram_jax_logs/r1.pid)"


def test_tpu_pod_dry_run_options():
    result = _run(
        TPU_POD, *_POD_ARGS, "--num_workers=4", "--skip_install", "--jax=none", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    # Worker count given and no coordinator port: no describe, no install; start and stop only.
    assert len(commands) == 2
    launch_remote = _flag(commands[0], "command")
    assert "coordinator_address" not in launch_remote
    result = _run(TPU_POD, *_POD_ARGS, "--num_workers=4", "--jax=none", "--dry-run")
    assert "pip install -q -U" not in result.stdout
    assert "pip install -q -e" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--tpu": None}, "--tpu=NAME is required"),
        ({"--zone": None}, "--zone=ZONE is required"),
        ({"--zone": "central"}, "--zone: got 'central'"),
        ({"--config": "configs/missing.py"}, "does not exist"),
        ({"--workdir": "gs://bucket/run"}, "expected an absolute path mounted on every worker"),
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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: ")
