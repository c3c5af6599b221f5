"""One door for every byte of a run: local paths and filesystem URIs (s3://, gs://, ...) alike,
through pyarrow.fs.

Design choices
- A location is a plain string: a local path (relative, absolute or ~) or a URI with a scheme
  pyarrow knows. `resolve` turns it into (filesystem, path inside it); nothing here ever hands
  a URI to `open()` or `Path`, so no local folder named after a scheme (`./s3:/...`) can appear.
- Credentials, region and endpoint come from the standard environment (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL), which pyarrow and Ray Train both read, so
  the trainer, its checkpoints and every reader see the same bucket.
- Writes are whole objects: `write_bytes` is one PUT on an object store, and on a local disk a
  write to a temporary name renamed into place, so a reader never sees half a file either way.
  Nothing appends (object stores cannot); logs are written as parts (see hydra_ray/runlog.py).
- `check_storage` probes a location before any work starts and turns the ways it can fail (an
  unknown scheme, a missing bucket, wrong credentials, an unreachable endpoint, no permission)
  into one `StorageError` line that names the location.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from pathlib import Path

from hydra_ray.config import ConfigError


class StorageError(ConfigError):
    """A storage location cannot be used; the message is one line naming it."""


def is_uri(loc: str) -> bool:
    return "://" in str(loc)


def is_local(loc: str) -> bool:
    return not is_uri(loc) or str(loc).startswith("file://")


def absolute(loc: str | Path) -> str:
    """A local path made absolute (~ expanded); a URI without its trailing slash."""
    loc = str(loc)
    if is_uri(loc):
        return loc.rstrip("/")
    return str(Path(loc).expanduser().resolve())


def join(loc: str | Path, *parts: str) -> str:
    loc = str(loc)
    if is_uri(loc):
        return posixpath.join(loc.rstrip("/"), *parts)
    return os.path.join(loc, *parts)


def name(loc: str) -> str:
    """The last component ('runs/demo' -> 'demo', 's3://b/runs/demo' -> 'demo')."""
    return posixpath.basename(str(loc).rstrip("/")) if is_uri(loc) else Path(loc).name


def parent(loc: str) -> str:
    loc = absolute(loc)
    if is_uri(loc):
        scheme, _, rest = loc.partition("://")
        head = posixpath.dirname(rest)
        return f"{scheme}://{head}" if head else loc
    return str(Path(loc).parent)


def _describe(loc: str, e: Exception) -> str:
    text = " ".join(str(e).split())
    if "Unrecognized filesystem type" in text or "Unknown scheme" in text or "unrecognized scheme" in text.lower():
        scheme = str(loc).partition("://")[0]
        return (f"{loc}: unknown storage scheme {scheme!r} (use a local path or a URI pyarrow knows: "
                "s3://, gs://, hdfs://, abfs://)")
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{loc}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy)"
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text or "Couldn't resolve" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return f"{loc}: cannot reach the storage endpoint{f' {endpoint}' if endpoint else ''} ({text[:160]})"
    return f"{loc}: {text[:300]}"


def resolve(loc: str | Path):
    """(pyarrow FileSystem, path inside it) for a location. Raises StorageError."""
    import pyarrow.fs as pafs

    loc = str(loc)
    if not is_uri(loc):
        return pafs.LocalFileSystem(), absolute(loc)
    try:
        fs, path = pafs.FileSystem.from_uri(loc)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ValueError for bad URIs
        raise StorageError(_describe(loc, e)) from None
    return fs, path.rstrip("/")


def _call(loc: str, fn):
    try:
        return fn()
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except OSError as e:
        if "does not exist" in str(e) or "NoSuchKey" in str(e) or "Path does not exist" in str(e):
            raise FileNotFoundError(f"{loc}: no such file") from None
        raise StorageError(_describe(loc, e)) from None


def info(loc: str):
    fs, path = resolve(loc)
    return _call(loc, lambda: fs.get_file_info(path))


def exists(loc: str) -> bool:
    import pyarrow.fs as pafs

    return info(loc).type != pafs.FileType.NotFound


def is_file(loc: str) -> bool:
    import pyarrow.fs as pafs

    return info(loc).type == pafs.FileType.File


def is_dir(loc: str) -> bool:
    import pyarrow.fs as pafs

    return info(loc).type == pafs.FileType.Directory


def read_bytes(loc: str) -> bytes:
    """The whole object. Raises FileNotFoundError when there is none, StorageError otherwise."""
    fs, path = resolve(loc)

    def read():
        with fs.open_input_stream(path) as fh:
            return fh.read()

    return _call(loc, read)


def read_text(loc: str) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: str, data: bytes) -> None:
    """Replace the object at `loc` with `data`, whole (see the module notes)."""
    fs, path = resolve(loc)
    if is_local(loc):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return

    def put():
        with fs.open_output_stream(path) as fh:
            fh.write(data)

    _call(loc, put)


def write_text(loc: str, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def makedirs(loc: str) -> None:
    fs, path = resolve(loc)
    _call(loc, lambda: fs.create_dir(path, recursive=True))


def listdir(loc: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries directly under `loc`, sorted; [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    entries = _call(loc, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted((e.base_name, e.type == pafs.FileType.Directory) for e in entries)


def walk_files(loc: str) -> list[str]:
    """Paths of every file under `loc`, relative to it, sorted."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    entries = _call(loc, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    return sorted(posixpath.relpath(e.path, path) for e in entries if e.type == pafs.FileType.File)


def delete(loc: str) -> None:
    """Delete a file; a missing one is fine."""
    fs, path = resolve(loc)
    try:
        _call(loc, lambda: fs.delete_file(path))
    except FileNotFoundError:
        pass


def delete_dir(loc: str) -> None:
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    if _call(loc, lambda: fs.get_file_info(path)).type == pafs.FileType.Directory:
        _call(loc, lambda: fs.delete_dir(path))


def upload_dir(local_dir: str | Path, loc: str) -> None:
    """Copy a local folder's files to `loc` (same relative paths), replacing what is there."""
    for f in sorted(Path(local_dir).rglob("*")):
        if f.is_file():
            write_bytes(join(loc, *f.relative_to(local_dir).parts), f.read_bytes())


def check_storage(loc: str, what: str = "--storage") -> str:
    """Make sure a run can be written under `loc` before any work starts: the scheme is known,
    the bucket exists, the credentials work and the endpoint answers (one probe object is
    written and deleted). Returns the absolute location. Raises StorageError."""
    import pyarrow.fs as pafs

    loc = absolute(loc)
    if is_uri(loc) and "?" in loc:
        raise StorageError(f"{what} {loc}: options in the URI's query string are not supported (paths are "
                           "built by appending to the URI); set AWS_ENDPOINT_URL, AWS_REGION and the like instead")
    try:
        fs, path = resolve(loc)
    except StorageError as e:
        raise StorageError(f"{what} {e}") from None
    if not is_local(loc):
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{what} {loc}: no bucket in the URI (expected s3://BUCKET/PREFIX)")
        try:
            kind = fs.get_file_info(bucket).type
        except OSError as e:
            raise StorageError(f"{what} {_describe(loc, e)}") from None
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{what} {loc}: bucket {bucket!r} does not exist (create it first)")
    probe = join(loc, f".hydra-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"probe")
        delete(probe)
    except (StorageError, OSError) as e:
        msg = str(e) if isinstance(e, StorageError) else _describe(loc, e)
        raise StorageError(f"{what} {msg}") from None
    return loc
