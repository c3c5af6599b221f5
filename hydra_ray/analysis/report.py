"""`hydra-ray analyze`: a run's metrics / HYDRA text logs -> report.md, PNG plots, summary.json.

Design choices
- This module is imported by the CLI to build its parser, so it imports nothing heavy at the top;
  the loaders, statistics and matplotlib are imported inside `run`.
- PATH kinds: a run (a local folder or a URI such as s3://bucket/runs/x; it holds metrics parts
  or a metrics.jsonl), one metrics .jsonl file, a folder of HYDRA logs, or log files. One run is
  analysed at a time; any number of log files (of one training run, resumed or rotated) are
  merged. Mixing a run with text logs is an error, not a guess. HYDRA text logs are read from a
  local disk only (they come from the original trainer, not from a run on storage).
- --out may be a local folder or a URI. matplotlib writes files, so for a URI the report is
  rendered into a local temporary folder, uploaded with `storage.upload_dir` and the folder
  removed; the destination is probed (`check_storage`) before anything is rendered.
- User mistakes (missing path, nothing parseable, bad phase file, unusable --out) raise one-line
  ConfigErrors, which the CLI prints as `error: ...` with exit status 2.
- Outputs: OUT/summary.json (every figure), OUT/report.md (the same figures as tables, linking the
  PNGs beside it). `--json` also prints the summary on stdout for scripts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from hydra_ray import storage
from hydra_ray.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run (local folder or URI such as s3://bucket/runs/x), a metrics .jsonl file, "
                        "or HYDRA trainer text logs (local files or folders)")
    p.add_argument("--out", required=True,
                   help="output folder (local path or URI) for report.md, plots and summary.json")
    p.add_argument("--phases", default=None,
                   help="YAML list of {name, until_step, routing} (HYDRA logs; for a run it overrides config.yaml). "
                        "until_step is the last logged step of the phase; routing is learned/forced/teacher/free "
                        "or omitted while MoE is off")
    p.add_argument("--no-plots", action="store_true", help="write report.md and summary.json only")
    p.add_argument("--json", action="store_true", help="also print summary.json on stdout")


def load_source(paths: list[str], phase_file: str | None = None):
    """Resolve PATHs to a `Source` (hydra-ray run or HYDRA logs)."""
    from hydra_ray.analysis.hydra_logs import list_log_files, load_logs
    from hydra_ray.analysis.metrics_source import load_run
    from hydra_ray.analysis.model import load_phase_file, reference_phases
    from hydra_ray.runlog import has_logs

    phases = load_phase_file(phase_file) if phase_file else None
    runs, logs = [], []
    for raw in paths:
        loc = raw if storage.is_uri(raw) else str(Path(raw).expanduser())
        if not storage.exists(loc):
            raise ConfigError(f"{raw}: no such file or directory")
        if storage.is_file(loc) and loc.endswith(".jsonl"):
            runs.append(loc)
        elif storage.is_dir(loc) and has_logs(loc):
            runs.append(loc)
        elif storage.is_uri(loc):
            raise ConfigError(f"{raw}: not a hydra-ray run (no metrics/ parts or metrics.jsonl); "
                              "HYDRA text logs are read from a local path only")
        elif Path(loc).is_dir():
            found = list_log_files(Path(loc))
            if not found:
                raise ConfigError(f"{raw}: a folder with neither a hydra-ray run (metrics/ parts or metrics.jsonl) "
                                  "nor log files (*.log, *.txt, *.out)")
            logs += found
        else:
            logs.append(Path(loc))
    if runs and logs:
        raise ConfigError("give either one hydra-ray run (folder, URI or metrics .jsonl file) or HYDRA text logs, "
                          "not both")
    if len(runs) > 1:
        raise ConfigError(f"one hydra-ray run at a time, got {len(runs)}: " + ", ".join(map(str, runs)))
    if runs:
        return load_run(runs[0], phases)
    seen, uniq = set(), []
    for f in logs:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            uniq.append(f)
    return load_logs(uniq, phases or reference_phases())


def _eval_result(paths: list[str]) -> dict | None:
    """The newest `hydra-ray eval` result stored in the run (RUN/eval/), if PATH is a run folder."""
    from hydra_ray.evaluation import latest_result

    if len(paths) != 1:
        return None
    loc = paths[0] if storage.is_uri(paths[0]) else str(Path(paths[0]).expanduser())
    return latest_result(loc) if storage.is_dir(loc) else None


def analyze(paths: list[str], out: str, phase_file: str | None = None, plots: bool = True) -> dict:
    """Write OUT/summary.json, OUT/report.md and the plots (OUT local or a URI); return the summary."""
    from hydra_ray.analysis.advice import advise
    from hydra_ray.analysis.figures import summarize
    from hydra_ray.analysis.render import render
    from hydra_ray.analysis.verdict import verdict

    src = load_source(paths, phase_file)
    if not src.samples() and not any(r.util or r.eval_loss is not None for r in src.records):
        raise ConfigError("nothing to analyse: no step records in " + ", ".join(paths))
    summary = summarize(src)
    summary["tasks"] = _eval_result(paths)
    summary.update(advise(summary))
    summary["verdict"] = verdict(summary)
    remote = storage.is_uri(out)
    if remote:
        storage.check_storage(out, "--out")
        dest = Path(tempfile.mkdtemp(prefix="hydra-analyze-"))
    else:
        dest = Path(out).expanduser()
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot create ({e.strerror or e})") from None
    try:
        written: list[str] = []
        if plots:
            from hydra_ray.analysis.plots import write_plots

            written = write_plots(src, summary, dest)
        summary["plots"] = written
        (dest / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
        (dest / "report.md").write_text(render(summary, written) + "\n")
        if remote:
            storage.upload_dir(dest, out)
    finally:
        if remote:
            shutil.rmtree(dest, ignore_errors=True)
    return summary


def run(args: argparse.Namespace) -> int:
    summary = analyze(args.paths, args.out, args.phases, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary))
    else:
        st = summary["last_step"]
        print(f"wrote {storage.join(args.out, 'report.md')}, summary.json and {len(summary['plots'])} plot(s): "
              f"{summary['run']['n_samples']} samples over {len(summary['phases'])} phases, "
              f"last step {st.get('step')}, {len(summary['anomalies'])} anomalies, "
              f"{summary['parse']['unparsed_count']} unparsed line(s)")
    return 0
