"""hydra-ray analysis: `hydra-ray analyze PATH... --out DIR` (report.md, PNG plots, summary.json).

Modules: model (the one record model, phases, parse statistics), metrics_source (hydra-ray runs),
hydra_logs (the original HYDRA trainer's text logs), figures (every figure -> summary dict),
advice (observations and recommendations from those figures), plots (matplotlib PNGs),
render (report.md from the summary), report (CLI arguments and entry).
Each module's docstring lists its design choices.
"""
