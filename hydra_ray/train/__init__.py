"""Training: the curriculum as functions of the step (curriculum.py), the per-worker loop
(loop.py) over its environment (env.py) and state (state.py: optimizer, clipping, checkpoint
round trip), and the `hydra-ray train` driver on Ray Train v2 (driver.py)."""
