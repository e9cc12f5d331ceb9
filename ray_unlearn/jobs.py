"""Ray Jobs glue for `ray-unlearn submit`: run `ray-unlearn run|tune|finetune JOB.yaml [k=v ...]` on a cluster.

The working directory travels with the job (Ray's runtime env `working_dir`, minus Ray's default
excludes, `EXCLUDES`, .gitignore and .rayignore), the job's logs stream back, and the exit status is the job's:
0 when it SUCCEEDED, its driver's exit status (else 1) when it FAILED or was STOPPED, with the
job's own `error:` line printed. What can be checked here is checked before anything is sent:
the job file (inside the shipped directory), its config with the overrides, and the cluster's
answer at the address (one line naming what was tried, exit 2).

Token authentication (Ray 2.52+, on by default for local clusters since 2.59): the token is read
like Ray reads it, from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and
sent as `Authorization: Bearer <token>` on every request (upload, submit, log stream);
RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ray.dashboard.modules.job.common import JobStatus
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from ray_unlearn import storage
from ray_unlearn.config import JobConfig, load_config
from ray_unlearn.errors import UnlearnError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's client reads, in its order
# never shipped, beside Ray's own defaults (.git, .venv, venv, __pycache__): run outputs (they belong on shared
# storage) and caches
EXCLUDES = ["runs", "*.egg-info", ".pytest_cache", ".mypy_cache"]
RAY_PACKAGING_LOGGERS = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                         "ray.dashboard.modules.dashboard_sdk")
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
COMMANDS = ("run", "tune", "finetune")  # what a submitted job can run; `run` when none is named


@dataclass(frozen=True)
class Submission:
    """What `ray-unlearn submit` sends: the entrypoint, run from the shipped `working_dir`."""

    entrypoint: str
    working_dir: Path
    job_file: str  # relative to working_dir
    output_dir: str

    @property
    def runtime_env(self) -> dict:
        return {"working_dir": str(self.working_dir), "excludes": list(EXCLUDES)}


def resolve_address(address: str | None) -> tuple[str, str]:
    """(the dashboard's HTTP URL, where it came from): --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS,
    else the local default."""
    source = "--address"
    if not address:
        source, address = next(((v, os.environ[v]) for v in ADDRESS_VARIABLES if os.environ.get(v)),
                               ("the default", DEFAULT_ADDRESS))
    if address.startswith("ray://") or address == "auto":
        raise UnlearnError(f"{source} {address!r} is not a dashboard address; give the head's jobs API, "
                           "e.g. --address http://<head>:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/"), source


def auth_token() -> tuple[str | None, str]:
    """(the cluster token, where it came from), read as Ray reads it; (None, why) when there is none."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path_var = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var).expanduser() if path_var else Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(path)
    if path_var:
        raise UnlearnError(f"RAY_AUTH_TOKEN_PATH={path_var} is not a readable file holding the cluster's token; "
                           "fix the path or set RAY_AUTH_TOKEN")
    return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token are unset or empty)"


@contextmanager
def _address_variables_unset() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override its `address` argument; here --address wins."""
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None) -> JobSubmissionClient:
    """A JobSubmissionClient for the cluster at `address`, carrying the token; a one-line UnlearnError when no
    Ray cluster answers there or it refuses the token."""
    url, source = resolve_address(address)
    token, token_source = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _address_variables_unset():
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        refused = "refused the token from " + token_source if token else "requires a token and " + token_source
        raise UnlearnError(f"the Ray cluster at {url} {refused}: {str(e).splitlines()[0]}; set RAY_AUTH_TOKEN to "
                           "the cluster's token (`ray get-auth-token` on the head prints it)") from None
    except (ConnectionError, RuntimeError) as e:
        why = "nothing listens there" if isinstance(e, ConnectionError) else str(e).splitlines()[0]
        raise UnlearnError(f"no Ray cluster answers at {url} (from {source}; tried GET {url}/api/version: {why}); "
                           "start one with `ray start --head`, or give the head's jobs API with "
                           "--address http://<head>:8265 or RAY_ADDRESS") from None


def _quiet_packaging() -> None:
    """Ray logs each ignore file it reads, and each default exclude it applies, on every upload."""
    for name in RAY_PACKAGING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _shipped(path: Path, working_dir: Path) -> bool:
    """Whether `path` (inside working_dir) is uploaded: not under Ray's default excludes, EXCLUDES, .gitignore
    or .rayignore."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    excluded = [_get_excludes(working_dir, get_runtime_env_default_excludes() + EXCLUDES),
                *get_excludes_from_ignore_files(working_dir, include_gitignore=True)]
    chain = [path, *[p for p in path.parents if working_dir in p.parents]]
    return not any(exclude(p) for exclude in excluded for p in chain)


def check_command(command: str, cfg: JobConfig) -> None:
    """The checks `command` makes first on its config alone (no data, models or cluster needed)."""
    if command == "tune":
        from ray_unlearn.tune import check_search

        check_search(cfg)
    elif command == "finetune":
        from ray_unlearn.finetune import check_finetune

        check_finetune(cfg)
    else:
        from ray_unlearn.pipeline import validate

        validate(cfg)


def prepare(args: Sequence[str], working_dir: str) -> Submission:
    """Check the job file and its overrides here (the same checks the command makes first) and build the
    entrypoint. `args` is [COMMAND] JOB.yaml [key=value ...], COMMAND one of COMMANDS (default run)."""
    from ray_unlearn.cli import _split_args

    command, args = (args[0], args[1:]) if args and args[0] in COMMANDS else ("run", args)
    job, overrides = _split_args(args)
    if job is None:
        raise UnlearnError(f"submit needs a job file: ray-unlearn submit [{'|'.join(COMMANDS)}] JOB.yaml "
                           "[key=value ...] --address URL")
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise UnlearnError(f"--working-dir {working_dir} is not a directory; give the directory to ship")
    cfg = load_config(job, overrides)  # the job file exists and parses, the overrides name real fields and types
    check_command(command, cfg)
    path = Path(job).resolve()
    if root not in path.parents:
        raise UnlearnError(f"job file {job} is outside the shipped directory {root}; move it there or give "
                           "--working-dir a directory that holds it")
    if not _shipped(path, root):
        raise UnlearnError(f"job file {job} is excluded from the upload (.git, .venv, venv, __pycache__, "
                           f"{', '.join(EXCLUDES)}, .gitignore or .rayignore); move it out of the excluded path")
    rel = path.relative_to(root).as_posix()
    return Submission(shlex.join(["ray-unlearn", command, rel, *overrides]), root, rel, cfg.output_dir)


async def _stream(client: JobSubmissionClient, job_id: str) -> list[str]:
    """Print the job's log chunks as they come; returns them."""
    chunks = []
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    return chunks


def error_line(message: str | None, logs: str) -> str:
    """The job's own one-line error: the last `error: ...` line of its logs, else the first line of Ray's
    status message."""
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return (message or "the job failed without a message").strip().splitlines()[0]


def wait(client: JobSubmissionClient, job_id: str) -> int:
    """Stream the job's logs until it ends; its exit status (0 SUCCEEDED, else the driver's or 1)."""
    logs = ""
    try:
        logs = "".join(asyncio.run(_stream(client, job_id)))
    except (RuntimeError, OSError) as e:  # the log stream broke (a proxy, the network): keep polling the status
        warnings.warn(f"the log stream of {job_id} broke ({str(e).splitlines()[0]}); waiting for the job to end")
    info = client.get_job_info(job_id)
    while info.status not in TERMINAL:  # the log stream can close just before the status flips
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        print(f"job {job_id} SUCCEEDED")
        return 0
    line = error_line(info.message, logs or client.get_job_logs(job_id))
    print(f"error: job {job_id} {info.status.value}: {line}", file=sys.stderr)
    return info.driver_exit_code or 1


def submit(args: Sequence[str], address: str | None, working_dir: str = ".", no_wait: bool = False) -> int:
    """`ray-unlearn submit`: check, ship, run, stream; returns the exit status for the CLI."""
    _quiet_packaging()
    sub = prepare(args, working_dir)
    client = connect(address)
    if not storage.is_remote(sub.output_dir) and not Path(sub.output_dir).expanduser().is_absolute():
        warnings.warn(f"output_dir {sub.output_dir} is relative: on the cluster it lands in the job's temporary "
                      "working directory; give a bucket or a path every node mounts (output_dir=...)")
    try:
        job_id = client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env)
    except (RuntimeError, ValueError) as e:  # the upload or the submission refused (size, server error)
        raise UnlearnError(f"the cluster did not take the job: {str(e).splitlines()[0]}") from None
    print(f"submitted {job_id} to {client.get_address()}: {sub.entrypoint} (working dir {sub.working_dir})")
    if no_wait:
        print(f"follow it with `ray job logs --follow {job_id}`")
        return 0
    try:
        return wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nerror: stopped following; job {job_id} keeps running (`ray job stop {job_id}` ends it)",
              file=sys.stderr)
        return 130
