# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build for this machine and CI; GPU clusters install the project into their image's torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install browser test test-fast cluster-rehearsal demo proof gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

test: install browser
	$(BIN)/python -m pytest -m "not rehearsal"

# The lane to run while working: unit tests only, no Ray, no subprocess runs (under 2 minutes).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration and not rehearsal"

# The cluster flow on one machine (cluster-local.yaml's autoscaler, ray job submit, a node lost,
# serve deploy, hot swap): about 6 minutes on 2 cores, so it runs here and in CI beside `make test`.
cluster-rehearsal: install
	$(BIN)/python -m pytest -m rehearsal -s -p no:cacheprovider tests/test_rehearsal.py

# The inspector page's test drives Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The GPU path on one CUDA device (benchmarks/gpu_check.py, about 5 minutes), report in docs/gpu-check.md.
# It needs no .venv and no registry: on a GPU image it runs with that image's python3, torch and
# triton, and installs the wheels `make gpu-wheels` put in .whl/. Without a GPU it prints a skip line.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py

# Wheels for a GPU image without pydantic & co (Python 3.12, x86-64): a few MB, carried in .whl/.
GPU_WHEELS ?= pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 tensorboardX==2.6.4
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	@du -sh .whl && ls .whl

DEMO_PORT ?= 8765

# The main job: the built-in corpus, the tiny 7-phase curriculum on a local Ray with 2 workers,
# the training-analysis report of that run, then its last checkpoint served and queried over HTTP.
demo: install
	$(BIN)/hydra-ray summary --config configs/tiny.yaml
	$(BIN)/hydra-ray data prepare --out runs/corpus-tiny --size tiny --quiet
	rm -rf runs/demo
	$(BIN)/hydra-ray train --config configs/tiny.yaml --workers 2 --storage runs --name demo
	$(BIN)/hydra-ray analyze runs/demo --out runs/demo/report
	$(BIN)/hydra-ray serve --run runs/demo --port $(DEMO_PORT) --smoke
	@echo "demo run: runs/demo (metrics/, events/, tensorboard/, checkpoints/); report: runs/demo/report/report.md"

# The curriculum proof (README, "The curriculum proof"): 6-8 min of training on 2 cores, then the
# held-out tasks and the report with its curriculum verdict.
proof: install
	rm -rf runs/proof
	$(BIN)/hydra-ray train --config configs/proof.yaml --workers 2 --storage runs --name proof
	$(BIN)/hydra-ray eval runs/proof
	$(BIN)/hydra-ray analyze runs/proof --out runs/proof/report
	@echo "proof run: runs/proof; verdict: runs/proof/report/report.md"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
