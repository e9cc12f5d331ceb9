"""Where a run's files live: a local directory or a bucket (`s3://bucket/path`, `gs://bucket/path`).

Buckets go through pyarrow filesystems, as Ray Train's own `storage_path` does; multi-node runs need
one, because Ray does not copy worker disks to the head node. Credentials come from the usual places
(AWS: the AWS_* variables, ~/.aws, instance roles; GCS: application default credentials). An S3-protocol
server other than AWS (MinIO, Ceph, a test server) is named by AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
as the AWS SDKs read them (pyarrow itself ignores these variables), or by pyarrow's URI options
(`s3://bucket/path?endpoint_override=host:9000&scheme=http`). Ray-free.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from ray_unlearn.errors import UnlearnError

REMOTE_SCHEMES = ("s3", "gs", "gcs")
CONNECT_TIMEOUT_S = 10.0


def is_remote(location: str) -> bool:
    """True for a bucket URI (s3://, gs://), False for a local path (or file://)."""
    return urlsplit(location).scheme in REMOTE_SCHEMES


def check_location(key: str, location: str) -> None:
    """Refuse, without any network access, a URI whose scheme has no filesystem here."""
    if "://" not in location:
        return
    scheme = urlsplit(location).scheme
    if scheme not in (*REMOTE_SCHEMES, "file"):
        raise UnlearnError(f"{key}: no filesystem for {scheme}:// URIs; use a local path, s3://bucket/path "
                           "or gs://bucket/path")
    if scheme != "file" and not urlsplit(location).netloc:
        raise UnlearnError(f"{key}: {location!r} names no bucket; write {scheme}://bucket/path")


def join(location: str, *parts: str) -> str:
    """`location`/part/...: a local path or a URI (its query options kept at the end)."""
    if not is_remote(location):
        return str(Path(location, *parts))
    u = urlsplit(location)
    path = "/".join([u.path.rstrip("/"), *parts])
    return u._replace(path=path).geturl()


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path or bucket URI."""
    u = urlsplit(location)
    if u.scheme == "s3" and not u.query:
        return _s3(), (u.netloc + u.path).rstrip("/")
    if is_remote(location):
        try:
            return pafs.FileSystem.from_uri(location)  # gs://, or s3:// with pyarrow's options in the query
        except (OSError, ValueError) as e:
            raise UnlearnError(f"cannot open {location}: {_first_line(e)}") from None
    path = u.path if u.scheme == "file" else location
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def _s3() -> pafs.S3FileSystem:
    """S3 with the endpoint and region the AWS SDKs would use (pyarrow reads only the credentials)."""
    options: dict = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": 60.0}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        e = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=e.netloc, scheme=e.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # explicit keys travel with the filesystem to Ray Train's controller and workers, whose processes
        # may not have the driver's environment; otherwise each process asks its own credential chain
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**options)


def check_writable(key: str, location: str) -> None:
    """Before any work: the bucket exists, can be reached and takes a write (a marker, removed again)."""
    if not is_remote(location):
        return
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise UnlearnError(f"{key}: bucket {bucket!r} does not exist; create it or name another one")
        marker = f"{path}/.ray_unlearn_write_check_{uuid.uuid4().hex}"
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        fs.delete_file(marker)
    except OSError as e:
        raise UnlearnError(f"{key}: cannot write to {location}: {_first_line(e)}") from None


def upload(local_dir: Path, location: str) -> None:
    """Copy the files under `local_dir` to `location` (replacing files of the same name)."""
    fs, path = filesystem(location)
    fs.create_dir(path)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download(location: str, local_dir: Path) -> Path:
    """Copy the files under `location` into `local_dir`; returns `local_dir`."""
    fs, path = filesystem(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def subdirs(location: str) -> list[str]:
    """Names of the directories directly under `location` (empty when it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)


def read_text(location: str) -> str | None:
    """The text of the file at `location`, or None when there is none."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
