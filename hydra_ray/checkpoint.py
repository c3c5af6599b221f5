"""Checkpoints: RUN/checkpoints/step_XXXXXXXX/ with full weights, optimizer state, trainer state,
the config, and a manifest of checksums written last.

Layout of one checkpoint
- `model.safetensors`: the full state dict, experts under their global index, so any number of
  workers can load it (parallelize() slices experts after loading).
- `optimizer.safetensors`: AdamW state per parameter *name* (`<name>::exp_avg`, ...), experts
  gathered to their global index like the weights.
- `trainer_state.json`: step, phase, data position, world size, RNG state, metrics at save time.
- `config.yaml`: the full config the run was started with.
- `tokenizer.json` (runs with a tokenizer file): a copy, so a checkpoint is served anywhere; its
  config names it relatively (`data.tokenizer: tokenizer.json`), with its sha256.
- `manifest.json`, written last: every other file with its size and sha256.

Design choices
- Loading never unpickles: safetensors for tensors, JSON/YAML for the rest.
- A checkpoint counts only if its manifest exists and every file matches it; `latest_valid`
  walks back from the newest and skips incomplete or corrupt ones with a warning.
- Storage is addressed through pyarrow filesystems, so RUN may be local, NFS or s3://.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from hydra_ray import storage

if TYPE_CHECKING:  # torch loads only where tensors are touched: listing checkpoints (analysis) needs none
    import torch

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.yaml")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if hasattr(value, "detach"):  # tensors (AdamW's state holds nothing else but them)
                    out[f"{names[id(p)]}::{key}"] = value.detach()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor], slices: dict[str, slice] | None = None) -> int:
    """Restore AdamW state by parameter name; `slices` cuts global expert state to this rank."""
    slices = slices or {}
    loaded = 0
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        p = named.get(name)
        if p is None:
            continue
        if name in slices and value.dim() > 0:
            value = value[slices[name]]
        opt.state[p][field] = value.to(p.device, value.dtype if field == "step" else p.dtype).clone()
        loaded += 1
    return loaded


def write(path: Path, model_state: dict[str, torch.Tensor], opt_state: dict[str, torch.Tensor],
          trainer_state: dict, config_yaml: str, tokenizer_json: bytes | None = None) -> Path:
    """Write a complete checkpoint folder at `path` (a local directory), manifest last."""
    from safetensors.torch import save as st_save

    path.mkdir(parents=True, exist_ok=True)
    blobs = {
        "model.safetensors": st_save({k: v.contiguous().cpu() for k, v in model_state.items()}),
        "optimizer.safetensors": st_save({k: v.contiguous().cpu() for k, v in opt_state.items()}),
        "trainer_state.json": json.dumps(trainer_state, indent=1).encode(),
        "config.yaml": config_yaml.encode(),
    }
    if tokenizer_json is not None:
        blobs[TOKENIZER] = tokenizer_json
    manifest = {}
    for name, data in blobs.items():
        (path / name).write_bytes(data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps({"files": manifest, "step": trainer_state["step"]}, indent=1))
    return path


@dataclass
class Loaded:
    path: str
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    trainer_state: dict
    config_yaml: str


INFERENCE_FILES = ("model.safetensors", "trainer_state.json", "config.yaml")
TOKENIZER = "tokenizer.json"


def portable_config(cfg):
    """The config as a run or checkpoint stores it: its tokenizer is the copy beside it."""
    if cfg.data.tokenizer == "byte":
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.data.tokenizer = TOKENIZER
    return cfg


def inference_config(ckpt_dir: str | Path, config_yaml: str):
    """The checkpoint's config with a relative tokenizer path made absolute against the
    checkpoint's location, a folder or a URI (where training put its copy). Raises ConfigError."""
    import yaml

    from hydra_ray.config import parse_config

    cfg = parse_config(yaml.safe_load(config_yaml), storage.join(ckpt_dir, "config.yaml"))
    tok = cfg.data.tokenizer
    if tok != "byte" and not storage.is_uri(tok) and not Path(tok).is_absolute():
        cfg.data.tokenizer = storage.join(ckpt_dir, tok)
    return cfg


def _read_verified(fs, ckpt: str, files: tuple[str, ...] = FILES) -> Loaded:
    with fs.open_input_stream(f"{ckpt}/manifest.json") as fh:
        manifest = json.loads(fh.read())
    data = {}
    for name in files + ((TOKENIZER,) if TOKENIZER in manifest["files"] else ()):
        entry = manifest["files"][name]
        with fs.open_input_stream(f"{ckpt}/{name}") as fh:
            blob = fh.read()
        if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise ValueError(f"{name} does not match the manifest")
        data[name] = blob
    from safetensors.torch import load as st_load

    state = json.loads(data["trainer_state.json"])
    optimizer = st_load(data["optimizer.safetensors"]) if "optimizer.safetensors" in data else {}
    return Loaded(ckpt, int(state["step"]), st_load(data["model.safetensors"]), optimizer, state,
                  data["config.yaml"].decode())


def check_sizes(ckpt_dir: str) -> str:
    """A cheap look at a checkpoint before serving it: the manifest is there and every file it
    lists has its recorded size (a cut or missing file shows). Returns config.yaml's text.
    Checksums are verified when the weights are loaded, so they are read once, not twice.
    Raises ValueError."""
    try:
        manifest = json.loads(storage.read_text(storage.join(ckpt_dir, "manifest.json")))
        for name, entry in manifest["files"].items():
            if storage.info(storage.join(ckpt_dir, name)).size != entry["bytes"]:
                raise ValueError(f"{name} does not match the manifest")
        return storage.read_text(storage.join(ckpt_dir, "config.yaml"))
    except Exception as e:  # missing manifest or file, bad JSON, an unreachable store
        raise ValueError(f"checkpoint {ckpt_dir} is incomplete or corrupt ({e})") from None


def read_for_inference(ckpt_dir: str) -> Loaded:
    """Weights, trainer state and config of one checkpoint, checked against its manifest; the
    optimizer state is neither read nor verified (serving never needs it). Raises ValueError."""
    fs, path = storage.resolve(ckpt_dir)
    try:
        return _read_verified(fs, path, INFERENCE_FILES)
    except Exception as e:  # missing manifest, truncated or corrupt file, bad JSON
        raise ValueError(f"checkpoint {ckpt_dir} is incomplete or corrupt ({e})") from None


def list_steps(run_dir: str) -> list[tuple[int, str]]:
    import pyarrow.fs as pafs

    fs, base = storage.resolve(run_dir)
    root = f"{base}/checkpoints"
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    out = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        m = STEP_DIR.match(info.base_name)
        if m and info.type == pafs.FileType.Directory:
            out.append((int(m.group(1)), info.path))
    return sorted(out)


def _read_checked(fs, path: str) -> Loaded:
    """One checkpoint, verified. ValueError: incomplete or corrupt (a missing manifest or file, a
    file that does not match it, bad JSON or tensors); StorageError: the store cannot be read
    (network, credentials, throttling)."""
    from safetensors import SafetensorError

    try:
        return _read_verified(fs, path)
    except (FileNotFoundError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({e})") from None
    except OSError as e:
        raise storage.StorageError(f"checkpoint {path}: cannot be read ({e})") from None


def latest_valid(run_dir: str, before: int | None = None) -> Loaded | None:
    """The newest checkpoint whose files all match its manifest (optionally older than `before`).
    A checkpoint that is incomplete or corrupt is skipped with a warning; a store that cannot be
    read raises StorageError instead: falling back to an older checkpoint, or to none, would
    silently redo or discard training."""
    fs, _ = storage.resolve(run_dir)
    for step, path in reversed(list_steps(run_dir)):
        if before is not None and step >= before:
            continue
        try:
            return _read_checked(fs, path)
        except storage.StorageError:
            raise
        except ValueError as e:
            log.warning("skipping %s", e)
    return None


def read_step(run_dir: str, step: int) -> Loaded:
    """Checkpoint `step` of the run, verified against its manifest: the one rank 0 chose
    (`agreed_latest`). ValueError if it is missing, incomplete or corrupt; StorageError if the
    store cannot be read."""
    fs, base = storage.resolve(run_dir)
    path = f"{base}/checkpoints/{step_dir_name(step)}"  # by name: this rank's listing may lag
    loaded = _read_checked(fs, path)
    if loaded.step != step:
        raise ValueError(f"checkpoint {path} holds step {loaded.step}, not {step}")
    return loaded


_FAILED = -2  # what rank 0 sends when it could not choose (its own error is raised on rank 0)


def agreed_latest(run_dir: str, env) -> Loaded | None:
    """`latest_valid` as rank 0 sees it, on every rank. Ranks that each chose alone could restore
    different steps (a listing that lags on object storage, a checkpoint still arriving) and train
    on out of step, with collectives that no longer match. Every rank reads its own newest at once,
    as before; a rank whose choice differs from rank 0's reads rank 0's instead, and never falls
    back to another. If any rank fails, every rank raises (none is left waiting in a collective):
    the failing one its own error, the others one that says so."""
    import torch

    if not env.distributed:
        return latest_valid(run_dir)
    loaded, error = None, None
    try:
        loaded = latest_valid(run_dir)
    except Exception as e:  # noqa: BLE001  (raised below, after the others have heard of it)
        error = e
    mine = _FAILED if error is not None else loaded.step if loaded is not None else -1
    step = env.from_rank0(mine)
    if env.rank != 0 and error is None and step != mine and step != _FAILED:
        try:
            loaded = read_step(run_dir, step) if step >= 0 else None  # rank 0 found none: start afresh too
        except Exception as e:  # noqa: BLE001
            error = e
    failed = env.all_max(torch.tensor([1 if error is not None else 0], dtype=torch.int64)).item()
    if error is not None:
        raise error
    if failed:
        which = "rank 0 could not choose one" if step == _FAILED else f"step {step}"
        raise RuntimeError(f"another rank could not read the checkpoint to restore ({which}); its error is "
                           "in that worker's log")
    return loaded


def check_resumable(loaded: Loaded, batch_size: int) -> None:
    """The data a run reads at step s starts at row s x the global batch: resuming a checkpoint
    with another batch size would skip or repeat data. Raises ConfigError naming both sizes."""
    from hydra_ray.config import ConfigError

    was = loaded.trainer_state.get("global_batch")
    if was is not None and was != batch_size:
        raise ConfigError(f"checkpoint {loaded.path} was trained with train.batch_size {was}: resuming it with "
                          f"{batch_size} would skip or repeat data (keep {was}, or start a new run)")


def save_local(run_dir: str, step: int, keep: int, **parts) -> str:
    """Without Ray Train (in-process runs, one-worker Tune trials): write the checkpoint into a
    local temporary folder, copy it into RUN/checkpoints/step_X with the manifest last (so on any
    storage a reader never takes a half-copied checkpoint for a complete one), keep the newest
    `keep`."""
    import tempfile

    final = storage.join(run_dir, "checkpoints", step_dir_name(step))
    storage.delete_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"hydra-ckpt-{step}-"))
    try:
        write(tmp, **parts)
        names = sorted(f.name for f in tmp.iterdir())
        for name in [n for n in names if n != "manifest.json"] + ["manifest.json"]:
            storage.write_bytes(storage.join(final, name), (tmp / name).read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(run_dir, step, keep)
    return final


def prune(run_dir: str, step: int, keep: int) -> None:
    """After checkpoint `step` is written (by the run's only writer): keep it and the newest
    `keep` - 1 complete ones before it, and drop the incomplete ones before it (writes that never
    finished). Folders after `step` (a run resumed to an earlier end) are left alone: a half-written
    folder never pushes a complete checkpoint out."""
    older = [s for s, _ in list_steps(run_dir) if s < step]
    complete = [s for s in older if is_complete(run_dir, s)]
    kept = set(complete[-(keep - 1):]) if keep > 1 else set()
    for s in older:
        if s not in kept:
            storage.delete_dir(storage.join(run_dir, "checkpoints", step_dir_name(s)))


def is_complete(run_dir: str, step: int) -> bool:
    """Whether checkpoint `step` was written to the end (its manifest, written last, is there);
    its checksums are verified when it is loaded."""
    return storage.is_file(storage.join(run_dir, "checkpoints", step_dir_name(step), "manifest.json"))
