"""The checkpoint store: which checkpoints a server may load, and where each one lies.

Design choices
- A model id names a checkpoint inside one store: `RUN` (its newest valid checkpoint) or
  `RUN@STEP`, RUN being a run directory's path relative to the store. Ids are checked twice:
  syntactically (no absolute paths, no `..` or `.`, no odd characters) and against the store's
  location (every path we open must still lie inside it; on a local disk after resolving
  symlinks, on object storage as a key prefix, since a key cannot be a symlink). A violation is
  an `EngineError(400)`.
- The store is a local folder or a URI (s3://bucket/runs): everything goes through
  hydra_ray.storage, so a checkpoint's location is a string, never a Path.
- No torch, no Ray: the ingress resolves ids with it as cheaply as the model replicas do.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from hydra_ray import checkpoint as ckpt
from hydra_ray import storage
from hydra_ray.serve.errors import EngineError

_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}(/[A-Za-z0-9_.-]{1,128}){0,15}(@[0-9]{1,12})?")


@dataclass(frozen=True)
class CheckpointRef:
    model_id: str  # canonical: RUN@STEP
    run: str
    step: int
    path: str  # the checkpoint's location: an absolute local path or a URI


def _missing(loc: str, what: str) -> str:
    """Why `loc` (which does not exist) is missing, in one line: a URI's bucket may be absent."""
    if storage.is_uri(loc):
        scheme, _, rest = loc.partition("://")
        bucket = rest.split("/", 1)[0]
        if bucket and not storage.exists(f"{scheme}://{bucket}"):
            return f"{loc}: bucket {bucket!r} does not exist"
    return f"{loc} is not {what}"


class CheckpointStore:
    """Checkpoints under one location: ROOT/RUN/checkpoints/step_XXXXXXXX (RUN may be nested);
    ROOT is a local folder or a URI. With `run`, only that run's checkpoints are listed and
    resolved (`serve --run R` serves R, not whatever else happens to lie beside it).
    Raises EngineError for a store that is not there, StorageError when it cannot be read."""

    def __init__(self, root: str | Path, run: str | None = None):
        import pyarrow.fs as pafs

        fs, path = storage.resolve(root)
        # file:// is a local folder too, and gets the same symlink checks
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.local else storage.absolute(root)
        self.run = run
        if not storage.is_dir(self.root):
            raise EngineError(400, f"checkpoint store {_missing(self.root, 'a directory')}")

    @property
    def spec(self) -> dict:
        """What a replica needs to open the same store: `CheckpointStore(**spec)`."""
        return {"root": self.root, "run": self.run}

    def _inside(self, loc: str, model_id: str) -> str:
        """`loc` itself (local: with symlinks resolved) when it lies inside the store."""
        if self.local:
            real, root = Path(loc).resolve(), Path(self.root)
            inside = real == root or root in real.parents
            out = str(real)
        else:
            scheme, _, rest = loc.partition("://")
            key, prefix = posixpath.normpath(rest), self.root.partition("://")[2]
            inside = key == prefix or key.startswith(prefix + "/")
            out = f"{scheme}://{key}"
        if not inside:
            raise EngineError(400, f"model {model_id!r} points outside the checkpoint store")
        return out

    def resolve(self, model_id: str) -> CheckpointRef:
        if not isinstance(model_id, str) or not _ID.fullmatch(model_id) or len(model_id) > 512:
            raise EngineError(400, f"model {model_id!r} is not a valid model id (RUN or RUN@STEP, "
                                   "a relative path inside the checkpoint store)")
        run, _, step_s = model_id.partition("@")
        if any(part in (".", "..") for part in run.split("/")):
            raise EngineError(400, f"model {model_id!r} may not contain '.' or '..' path segments")
        if self.run is not None and run != self.run:
            raise EngineError(404, f"model {model_id!r}: this server serves run {self.run!r} only")
        try:
            return self._resolve(model_id, run, step_s)
        except (storage.StorageError, OSError) as e:
            if self.local:  # a name the disk refuses
                raise EngineError(400, f"model {model_id!r}: {getattr(e, 'strerror', None) or e}") from None
            raise self._unreadable(e) from None

    def _unreadable(self, e: Exception) -> EngineError:
        """A store on object storage that stopped answering: the bucket went away, the
        credentials expired, the endpoint is down. Not the client's fault: 503."""
        return EngineError(503, f"checkpoint store {self.root} cannot be read ({' '.join(str(e).split())[:300]})")

    def _resolve(self, model_id: str, run: str, step_s: str) -> CheckpointRef:
        run_dir = self._inside(storage.join(self.root, run), model_id)

        def step_dir(step: int) -> str:
            return storage.join(run_dir, "checkpoints", ckpt.step_dir_name(step))

        if step_s:
            step = int(step_s)
        else:  # the newest complete checkpoint (one still being written has no manifest yet)
            steps = [n for n, _ in ckpt.list_steps(run_dir) if storage.is_file(storage.join(step_dir(n), "manifest.json"))]
            if not steps:
                raise EngineError(404, f"model {model_id!r}: no checkpoints in run {run!r}")
            step = steps[-1]
        path = self._inside(step_dir(step), model_id)
        if not storage.is_file(storage.join(path, "manifest.json")):
            raise EngineError(404, f"model {model_id!r}: no such checkpoint in the store")
        for name in ckpt.INFERENCE_FILES + ("manifest.json", ckpt.TOKENIZER):  # a symlinked file must not leave either
            self._inside(storage.join(path, name), model_id)
        return CheckpointRef(f"{run}@{step}", run, step, path)

    def _runs(self) -> list[str]:
        """Candidate run paths relative to the store (resolve() still checks each one)."""
        if self.run is not None:
            return [self.run]
        if self.local:  # pathlib's walk does not follow symlinked folders; pyarrow's local one does, loops too
            root = Path(self.root)
            return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("checkpoints") if p.is_dir())
        return sorted({f.rpartition("/checkpoints/")[0] for f in storage.walk_files(self.root) if "/checkpoints/" in f})

    def list(self) -> list[CheckpointRef]:
        try:
            found = [(run, step) for run in self._runs() if _ID.fullmatch(run)
                     for step, _ in ckpt.list_steps(storage.join(self.root, run))]
        except (storage.StorageError, OSError) as e:
            if self.local:
                raise
            raise self._unreadable(e) from None
        out = []
        for run, step in found:
            try:
                out.append(self.resolve(f"{run}@{step}"))
            except EngineError as e:  # ids that leave the store, incomplete checkpoints: not servable
                if e.status == 503:
                    raise
        return out

    @staticmethod
    def for_run(run_dir: str | Path) -> tuple["CheckpointStore", str]:
        """The store around a run directory (local or a URI) and the id of its newest checkpoint."""
        run = storage.absolute(run_dir)
        if storage.parent(run) == run or not storage.is_dir(storage.join(run, "checkpoints")):
            raise EngineError(400, _missing(str(run_dir), "a run directory (no checkpoints/ folder)"))
        store = CheckpointStore(storage.parent(run), run=storage.name(run))
        return store, store.resolve(store.run).model_id

    @staticmethod
    def for_checkpoint(ckpt_dir: str | Path) -> tuple["CheckpointStore", str]:
        """The store around RUN/checkpoints/step_XXXXXXXX (local or a URI) and that checkpoint's id."""
        p = storage.absolute(ckpt_dir)
        m = ckpt.STEP_DIR.match(storage.name(p))
        if not m or storage.name(storage.parent(p)) != "checkpoints":
            raise EngineError(400, f"{ckpt_dir} is not a checkpoint directory (RUN/checkpoints/step_XXXXXXXX)")
        run = storage.parent(storage.parent(p))
        store = CheckpointStore(storage.parent(run), run=storage.name(run))
        return store, store.resolve(f"{store.run}@{int(m.group(1))}").model_id
