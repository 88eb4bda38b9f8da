# wanrt — the two commands a new user needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
ENGINE_ARGS ?=
SOAK_MINUTES ?= 10

.PHONY: install serve test lint bench soak clean engines gpu-check gpu-bundle

# torch is pinned and installed first: an unpinned resolve pulls a multi-GB CUDA build. The cluster extra (Ray) is
# installed too, so `make test` runs the cluster tests; `wanrt serve` itself never imports Ray.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev,cluster]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/wanrt serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Two pytest-xdist workers, one test file each at a time (module fixtures such as a server or a Ray cluster stay
# with their file): the suite mostly waits on servers and peers, so two share two cores well (13:49 against 26:49
# one after the other, benchmarks/RESULTS.md). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The default pipelines at their seed resolutions, for the GPU present: TensorRT where it is importable, else an
# AOTInductor package. Without weight files (or on a CPU machine) try ENGINE_ARGS=--random-weights.
engines: install
	@echo "make engines: wanrt engines build $(ENGINE_ARGS) (engines dir: $${WANRT_ENGINES_DIR:-~/.wanrt/engines})"
	$(PY) -m serve.cli engines build $(ENGINE_ARGS)
	$(PY) -m serve.cli engines list

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

bench: install
	$(PY) -m benchmarks.serve_passthrough

# Two servers for SOAK_MINUTES (a tiny random-weight model stream; a passthrough stream with sessions joining and
# leaving): RSS, fds, threads and sessions every 30 s, and their slopes. Results go in benchmarks/RESULTS.md.
soak: install
	$(PY) -m benchmarks.soak --minutes $(SOAK_MINUTES)

# The one command for a CUDA machine (≤ 9 min): writes gpu-report.md / .json to $OUT (or OUT_DIR). It runs with the
# machine's own python3 and torch when there is no venv (a GPU machine may have no network), with what
# .gpu-bundle/ carries (`make gpu-bundle`, here); DRY=1 checks the script on the tiny config on a CPU in a minute;
# PARTS="frame_path pipelines" runs only those.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
OUT_DIR ?= $(or $(OUT),gpu-report)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out $(OUT_DIR) $(if $(DRY),--dry) $(if $(PARTS),--parts $(PARTS))

# What a bare GPU machine lacks for gpu-check (msgspec, ftfy, the web stack, PyAV, PyNvVideoCodec), for its Python,
# packed into .gpu-bundle/ (≈37 MB, under the 64 MiB a device call carries). Needs PyPI; about 2 minutes.
gpu-bundle: install
	$(PY) -m benchmarks.gpu_bundle
