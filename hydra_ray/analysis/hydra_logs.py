"""Parse the original HYDRA trainer's text logs into a `Source`.

Design choices
- Both Step-line formats are read by one tolerant parser: it finds `Step N/M` and then looks for
  each `Key: value` field on its own, so extra text, emoji, padding and reordered fields do not
  matter. A line is "new" format when it carries CE or a pre/post grad pair, else "old". A Step
  line without a readable loss is malformed (listed, not guessed).
- Every non-blank line is either parsed or listed as unparsed with a reason (malformed metric
  line, a HYDRA message the analysis does not read, or text without the log prefix); nothing is
  dropped silently.
- Order is time, not the command line: each file keeps its own line order, files are merged on
  the `asctime` of their lines (a line without a prefix inherits the time of the line above; ties
  go to the path name). So `train.log train.log.1` and the reverse give the same result.
- Resumed runs: when a Step line goes back to step s (at or before the last step seen), the
  earlier run's Step, [MoE] and [EVAL] lines at steps >= s are superseded - the resumed run wins
  and each step is counted once. A repeated [MoE]/[EVAL] step on its own also keeps the later line.
- Utilisation percentages are used as logged (divided by 100, not renormalised): they are
  rounded in the log, and renormalising would invent precision.
- Routing mode and phase of each step come from the phases (the reference run's seven phases by
  default, or --phases), because these logs do not name them.
"""

from __future__ import annotations

import heapq
import re
from datetime import datetime, timezone
from pathlib import Path

from hydra_ray.analysis.model import ParseStats, Phase, Record, Source, phase_of
from hydra_ray.config import ConfigError

_NUM = r"[-+]?(?:nan|inf(?:inity)?|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_PREFIX = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[,.]\d+)?)\s*-\s*HYDRA\s*-\s*([A-Z]+)\s*-\s?(.*)$")
_STEP = re.compile(r"\bStep\s+(\d+)\s*/\s*(\d+)")
_LOSS = re.compile(rf"\bLoss:\s*({_NUM})(?:\s*\(EMA:\s*({_NUM})\))?", re.I)
_CE = re.compile(rf"\bCE:\s*({_NUM})(?:\s*\(EMA:\s*({_NUM})\))?", re.I)
_LR = re.compile(rf"\bLR:\s*({_NUM})", re.I)
_GRAD_NEW = re.compile(rf"\bGrad:\s*pre\s*({_NUM})\s*\|?\s*post\s*({_NUM})", re.I)
_GRAD_OLD = re.compile(rf"\bGrad:\s*({_NUM})", re.I)
_CLIPPED = re.compile(rf"\bclipped\s*({_NUM})\s*%", re.I)
_TOKS = re.compile(rf"({_NUM})\s*K\s*tok/s", re.I)
_MOE = re.compile(r"\[MoE\]\s*step\s*=\s*(\d+)")
_KV = re.compile(rf"\b(div|ent)\s*=\s*({_NUM})", re.I)
_UTIL = re.compile(r"util\s*=\s*\[([^\]]*)\]")
_EVAL = re.compile(rf"\[EVAL\]\s*step\s*=\s*(\d+)\s+eval_loss\s*=\s*({_NUM})(?:\s+train_loss\s*=\s*({_NUM}))?", re.I)
_EVAL_LOOSE = re.compile(r"\[EVAL\]")
_CKPT = re.compile(r"Checkpoint saved:\s*(\S+)")
_CKPT_STEP = re.compile(r"step[_-]?(\d+)", re.I)
_TOKENS_PER_STEP = re.compile(r"Tokens per step:\s*([\d,_]+)")
_LOG_NAME = re.compile(r"\.(log|txt|out)(\.\d+)?$", re.I)


def _f(s: str | None) -> float | None:
    return float(s) if s is not None else None


def _time(stamp: str) -> float:
    stamp = stamp.replace("T", " ").replace(",", ".")
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
    return datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc).timestamp()


def list_log_files(path: Path) -> list[Path]:
    """A folder's log files: *.log, *.txt, *.out (and rotated .log.N), or files without a suffix."""
    out = []
    for p in sorted(path.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        if _LOG_NAME.search(p.name) or "." not in p.name:
            out.append(p)
    return out


def _parse_step(msg: str) -> dict | None:
    m = _STEP.search(msg)
    loss = _LOSS.search(msg)
    if not m or not loss:
        return None
    d = {"step": int(m.group(1)), "max": int(m.group(2)), "loss": float(loss.group(1)),
         "loss_ema": _f(loss.group(2))}
    ce = _CE.search(msg)
    lr = _LR.search(msg)
    gn = _GRAD_NEW.search(msg)
    clip = _CLIPPED.search(msg)
    toks = _TOKS.search(msg)
    d["ce"], d["ce_ema"] = (float(ce.group(1)), _f(ce.group(2))) if ce else (None, None)
    d["lr"] = float(lr.group(1)) if lr else None
    if gn:
        d["grad"], d["grad_post"] = float(gn.group(1)), float(gn.group(2))
    else:
        go = _GRAD_OLD.search(msg)
        d["grad"], d["grad_post"] = (float(go.group(1)) if go else None), None
    d["clip_pct"] = float(clip.group(1)) if clip else None
    d["tok_s"] = float(toks.group(1)) * 1000 if toks else None
    d["fmt"] = "new" if (ce or gn) else "old"
    return d


def _parse_moe(msg: str) -> dict | None:
    m = _MOE.search(msg)
    u = _UTIL.search(msg)
    if not m or not u:
        return None
    parts = [x.strip().rstrip("%").strip() for x in u.group(1).replace(",", "/").split("/")]
    try:
        util = [float(x) / 100 for x in parts if x]
    except ValueError:
        return None
    if not util:
        return None
    kv = {k.lower(): float(v) for k, v in _KV.findall(msg)}
    return {"step": int(m.group(1)), "util": util, "div": kv.get("div"), "ent": kv.get("ent")}


def _classify(msg: str) -> tuple[str, dict | None, str]:
    """(kind, payload, reason-if-unparsed) for one message."""
    if _STEP.search(msg) and ("Loss" in msg or "|" in msg):
        d = _parse_step(msg)
        return ("step", d, "") if d else ("bad", None, "malformed Step line (no loss)")
    if "[MoE]" in msg:
        d = _parse_moe(msg)
        return ("moe", d, "") if d else ("bad", None, "malformed [MoE] line")
    if _EVAL_LOOSE.search(msg):
        m = _EVAL.search(msg)
        if not m:
            return "bad", None, "malformed [EVAL] line"
        return "eval", {"step": int(m.group(1)), "eval_loss": float(m.group(2)), "train_loss": _f(m.group(3))}, ""
    m = _CKPT.search(msg)
    if m:
        return "ckpt", {"path": m.group(1)}, ""
    m = _TOKENS_PER_STEP.search(msg)
    if m:
        return "tokens", {"n": int(re.sub(r"[,_]", "", m.group(1)))}, ""
    return "other", None, ""


def _entries(path: Path, key: str, stats: ParseStats):
    """Yield (time, key, line_no, kind, payload) in file order; time never goes backwards."""
    info = stats.new_file(str(path))
    t = float("-inf")
    try:
        f = path.open(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not stats.count(info, line):
                continue
            pre = _PREFIX.search(line)
            if pre:
                try:
                    t = max(t, _time(pre.group(1)))
                except ValueError:
                    pass
                msg = pre.group(3)
            else:
                msg = line
            kind, payload, reason = _classify(msg)
            if kind == "bad" or (kind == "other" and not pre):
                stats.bad(str(path), n, line, reason or "not a HYDRA log line")
                info["unparsed"] += 1
                continue
            if kind == "other":
                stats.bad(str(path), n, line, "HYDRA message the analysis does not read")
                info["unparsed"] += 1
                continue
            info["parsed"] += 1
            stats.lines_parsed += 1
            yield t, key, n, kind, payload


def load_logs(files: list[Path], phases: list[Phase]) -> Source:
    stats = ParseStats()
    streams = [_entries(p, str(p), stats) for p in sorted(files, key=str)]
    steps: dict[int, tuple[float, dict]] = {}
    moe: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    ckpts: list[dict] = []
    tokens_per_step = None
    max_steps = None
    last_step = None
    last_file = None
    for t, key, n, kind, d in heapq.merge(*streams, key=lambda e: (e[0], e[1])):
        if kind == "step":
            s = d["step"]
            if last_step is not None and s <= last_step:
                gone = [x for x in steps if x >= s]
                stats.relogged += len(gone)
                stats.resumes.append({"file": key, "line": n, "from_step": last_step, "to_step": s,
                                      "previous_file": last_file})
                for x in gone:
                    del steps[x]
                for table in (moe, evals):
                    for x in [x for x in table if x >= s]:
                        del table[x]
                ckpts[:] = [c for c in ckpts if c["step"] is None or c["step"] < s]
            steps[s] = (t, d)
            last_step, last_file = s, key
            max_steps = d["max"]
            stats.formats[d["fmt"]] = stats.formats.get(d["fmt"], 0) + 1
        elif kind == "moe":
            moe[d["step"]] = d
        elif kind == "eval":
            evals[d["step"]] = d
        elif kind == "ckpt":
            m = _CKPT_STEP.search(Path(d["path"]).name)
            step = int(m.group(1)) if m else last_step  # else: saved after the last Step line
            ckpts.append({"step": step, "path": d["path"]})
        elif kind == "tokens":
            tokens_per_step = d["n"]
    # formats count the Step lines that survive (each step once)
    stats.formats = {}
    for _, d in steps.values():
        stats.formats[d["fmt"]] = stats.formats.get(d["fmt"], 0) + 1
    if not steps and not moe and not evals:
        raise ConfigError(f"no HYDRA Step, [MoE] or [EVAL] lines found in {len(files)} file(s) "
                          f"({stats.lines_read} lines read)")
    records: dict[int, Record] = {}
    for s, (t, d) in steps.items():
        nan = d["loss"] != d["loss"] or d["loss"] in (float("inf"), float("-inf"))
        r = Record(step=s, is_sample=True, fmt=d["fmt"], loss=None if nan else d["loss"], nan=nan,
                   ce=d["ce"] if not nan else None, loss_ema=d["loss_ema"], ce_ema=d["ce_ema"], lr=d["lr"],
                   grad=d["grad"] if d["grad"] is not None and d["grad"] == d["grad"] else None,
                   grad_post=d["grad_post"], clip_pct=d["clip_pct"], tok_s=d["tok_s"],
                   time=t if t != float("-inf") else None)
        if r.grad is not None and r.grad_post is not None:
            r.clipped = r.grad > r.grad_post
        elif d["clip_pct"] is not None:
            r.clipped = d["clip_pct"] > 0
        records[s] = r
    for s, d in moe.items():
        r = records.setdefault(s, Record(step=s))
        r.util, r.moe_div, r.moe_ent = d["util"], d["div"], d["ent"]
    for s, d in evals.items():
        r = records.setdefault(s, Record(step=s))
        r.eval_loss, r.eval_train_loss = d["eval_loss"], d["train_loss"]
    out = [records[s] for s in sorted(records)]
    for r in out:
        p = phase_of(phases, r.step)
        if p is not None:
            r.phase = p.name
            r.seed_locked = p.seed_locked
            if r.util is not None or "moe" in p.features:
                r.routing = p.routing
    src = Source(kind="HYDRA logs", label=Path(files[0]).parent.name if len(files) > 1 else Path(files[0]).name,
                 paths=[str(p) for p in files], records=out, phases=phases, parse=stats)
    src.checkpoints = sorted(ckpts, key=lambda c: (c["step"] is None, c["step"] or 0))
    src.tokens_per_step = tokens_per_step
    src.max_steps = max_steps
    src.num_experts = next((len(r.util) for r in out if r.util), None)
    for a, b in zip(phases, phases[1:]):
        on = [f for f in b.features if f not in a.features]
        if on:
            src.events.append({"step": b.start_step, "event": "switch_on", "detail": f"{'+'.join(on)} switched on (phase plan)"})
    for rs in stats.resumes:
        src.events.append({"step": rs["to_step"], "event": "resumed",
                           "detail": f"log goes back from step {rs['from_step']} to {rs['to_step']} "
                                     f"({Path(rs['file']).name}:{rs['line']}); the later lines win"})
    for c in src.checkpoints:
        src.events.append({"step": c["step"], "event": "checkpoint", "detail": c["path"]})
    return src
