"""A run's logs on any storage: metrics and events written as parts, read back merged; the same
scalars also go to TensorBoard.

Layout (RUN is a local folder or a URI such as s3://bucket/runs/NAME)
- `RUN/metrics/part-<first step, 10 digits>.jsonl`: one strict-JSON object per logged step.
- `RUN/events/part-<attempt start, ms>.jsonl`: starts, restores, NaN skips, roll-backs, stops.
- `RUN/tensorboard/`: TensorBoard event files (`tensorboard --logdir RUN`).

Design choices
- Object stores cannot append, so rank 0 keeps the lines of the current part in memory and
  rewrites that part whole at each flush. A part ends at every checkpoint (the next logged step
  starts a new one), so a part never grows past one checkpoint interval and every line logged
  before the last checkpoint is in a closed part.
- Flushes: at every eval and checkpoint step, when the run stops or ends, and otherwise whenever
  `flush_interval_s` has passed since the last one (0 on a local disk: every logged line is
  flushed; 10 s on an object store). So a crash loses at most the lines of one flush interval,
  and never anything logged before the last checkpoint.
- Exactly once: a run (re)started from checkpoint step S, and a NaN roll-back to S, first drops
  what was logged after S (parts that start after S are deleted, a part running past S is
  rewritten without those lines), because those steps will be logged again. Readers merge the
  parts in order and still keep one record per step, the later write winning, so a crash between
  the two rewrites cannot show a step twice.
- One reader (`read_records`) for everyone: the driver's progress lines, Tune, the analysis, tests.
  It also reads the single `metrics.jsonl` / `events.jsonl` of runs written before parts.
- TensorBoard (tensorboardX): written straight into RUN/tensorboard on a local disk; on an object
  store into a local temporary folder that is uploaded at each flush and removed at close. A
  restart purges the steps it will log again (`purge_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time

from hydra_ray import storage

log = logging.getLogger(__name__)
KINDS = ("metrics", "events")
_PART = re.compile(r"^part-(\d+)\.jsonl$")


def json_safe(v):
    """`v` with NaN and infinities as None (strict JSON has neither), through dicts and lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def strict_json(rec: dict) -> str:
    """One JSON object that strict parsers accept: NaN and infinities become null (a skipped
    step also says so in `nan_skipped`)."""
    return json.dumps(json_safe(rec), allow_nan=False)


# --------------------------------------------------------------------------- reading
def parts(run: str, kind: str) -> list[str]:
    """Locations of the run's parts of `kind`, in order (a pre-parts single file first)."""
    out = []
    legacy = storage.join(run, f"{kind}.jsonl")
    if storage.is_file(legacy):
        out.append(legacy)
    names = [n for n, is_dir in storage.listdir(storage.join(run, kind)) if not is_dir and _PART.match(n)]
    out += [storage.join(run, kind, n) for n in sorted(names, key=lambda n: int(_PART.match(n).group(1)))]
    return out


def _first_step(loc: str) -> int | None:
    m = _PART.match(storage.name(loc))
    return int(m.group(1)) if m else None


def read_lines(run: str, kind: str, after: int | None = None):
    """(part location, 1-based line number, line) of every line of every part, in order. With
    `after`, metrics parts that end before step after + 1 are not read (a part runs up to the next
    part's first step), so a poller of a long run reads only its newest parts."""
    locs = parts(run, kind)
    if after is not None:
        starts = [_first_step(loc) for loc in locs]
        locs = [loc for i, loc in enumerate(locs)
                if i + 1 >= len(locs) or starts[i + 1] is None or starts[i + 1] > after + 1]
    for loc in locs:
        try:
            yield from file_lines(loc)
        except FileNotFoundError:  # deleted by a restart between listing and reading
            continue


def file_lines(loc: str):
    """(loc, 1-based line number, line) of one log file; a torn character is one bad line."""
    text = storage.read_bytes(loc).decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        yield loc, n, line


def read_records(run: str, kind: str = "metrics", after: int | None = None) -> list[dict]:
    """Every record of `kind`: events in order; metrics one per step (the later write wins),
    sorted by step, only steps after `after` when given. Lines that do not parse are skipped."""
    recs = []
    for _, _, line in read_lines(run, kind, after):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    if kind == "events":
        return recs
    by_step = {r["step"]: r for r in recs if isinstance(r.get("step"), int) and (after is None or r["step"] > after)}
    return [by_step[s] for s in sorted(by_step)]


def has_logs(run: str) -> bool:
    return bool(parts(run, "metrics"))


# --------------------------------------------------------------------------- writing
class TensorBoard:
    """Scalars of each metrics record, as TensorBoard shows them (tensorboardX)."""

    def __init__(self, run: str, purge_step: int | None):
        from tensorboardX import SummaryWriter

        self.run = run
        self.remote = not storage.is_local(run)
        # a local run, as a path or a file:// URI: tensorboardX writes there itself
        self.dir = tempfile.mkdtemp(prefix="hydra-tb-") if self.remote else \
            os.path.join(storage.resolve(storage.absolute(run))[1], "tensorboard")
        self.writer = SummaryWriter(self.dir, purge_step=purge_step, flush_secs=3600)

    def add(self, rec: dict) -> None:
        step, w = rec["step"], self.writer
        for key in ("loss", "ce", "lr", "grad_norm", "grad_norm_clipped", "tokens_per_s", "domain_expert_agreement",
                    "mod_selected_frac", "mor_mean_depth", "mod_predictor_acc", "mor_predictor_acc"):
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                w.add_scalar(f"train/{key}", v, step)
        for key, v in (rec.get("aux") or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                w.add_scalar(f"aux/{key}", v, step)
        for e, v in enumerate(rec.get("expert_util") or []):
            w.add_scalar(f"expert_util/expert_{e}", v, step)
        ev = rec.get("eval") or {}
        if isinstance(ev.get("loss"), (int, float)):
            w.add_scalar("eval/loss", ev["loss"], step)
        for d, v in (ev.get("by_domain") or {}).items():
            w.add_scalar(f"eval/{d}", v, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_dir(self.dir, storage.join(self.run, "tensorboard"))

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)


class RunLog:
    """Rank 0's writer of a run's metrics and events parts (and TensorBoard); other ranks pass
    `enabled=False` and every call is a no-op."""

    def __init__(self, run: str, enabled: bool = True, flush_interval_s: float | None = None,
                 tensorboard: bool = True):
        self.run = storage.absolute(run)
        self.enabled = enabled
        self.interval = flush_interval_s if flush_interval_s is not None else (0.0 if storage.is_local(run) else 10.0)
        self.part_start: int | None = None
        self.lines: list[str] = []
        self.events_part = storage.join(self.run, "events", f"part-{int(time.time() * 1000):015d}.jsonl")
        self.event_lines: list[str] = []
        self.dirty = False
        self.last_flush = time.monotonic()
        self.tb_wanted = tensorboard
        self.tb: TensorBoard | None = None

    def restart(self, step: int) -> None:
        """The run continues after step `step` (0: from scratch): drop what was logged after it."""
        if not self.enabled:
            return
        for loc in parts(self.run, "metrics"):
            first = _first_step(loc)
            if first is not None and first > step:
                storage.delete(loc)
                continue
            lines = storage.read_text(loc).splitlines()
            keep = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            if len(keep) != len(lines):
                storage.write_text(loc, "".join(line + "\n" for line in keep))
        self.part_start, self.lines = None, []
        if self.tb is not None:
            self.tb.close()
        self.tb = TensorBoard(self.run, purge_step=step + 1) if self.tb_wanted else None

    def write(self, rec: dict, flush: bool = False) -> None:
        if not self.enabled:
            return
        if self.part_start is None:
            self.part_start = int(rec["step"])
        self.lines.append(strict_json(rec))
        if self.tb is not None:
            self.tb.add(rec)
        self.dirty = True
        if flush or time.monotonic() - self.last_flush >= self.interval:
            self.flush()

    def event(self, **rec) -> None:
        """Events are rare and matter after a crash: flushed at once."""
        if not self.enabled:
            return
        self.event_lines.append(strict_json({"time": time.time(), **rec}))
        storage.write_text(self.events_part, "".join(line + "\n" for line in self.event_lines))

    def flush(self) -> None:
        if not self.enabled or not self.dirty:
            return
        if self.part_start is not None:
            loc = storage.join(self.run, "metrics", f"part-{self.part_start:010d}.jsonl")
            storage.write_text(loc, "".join(line + "\n" for line in self.lines))
        if self.tb is not None:
            self.tb.flush()
        self.dirty = False
        self.last_flush = time.monotonic()

    def end_part(self) -> None:
        """After a checkpoint: flush, and start a new part at the next logged step."""
        self.flush()
        self.part_start, self.lines = None, []

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None
