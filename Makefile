# Two commands on a fresh machine: `make demo` and `make test`. Each creates the
# virtual environment .venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test notebooks bench clean

$(VENV)/installed-run: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/installed-dev: $(VENV)/installed-run requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

# Generate with the Gemma 2 demo checkpoint shipped in checkpoints/.
demo: $(VENV)/installed-run
	$(PY) generate.py

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
