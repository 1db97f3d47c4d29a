# Set-up and entry points. `make quickstart` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_DATA ?= ../shared/data

.PHONY: venv test quickstart bench clean

venv: $(STAMP)

# Re-installs only when a requirements file or pyproject.toml changed; otherwise a no-op. The checkout
# itself is installed editable, so `from models.extractor import ...` works from any directory.
$(STAMP): requirements.txt requirements_torch.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements_torch.txt -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -rs tests

# The whole pipeline on built-in data (pipeline/quickstart.py); everything goes to $(QUICKSTART_OUT).
# QUICKSTART_MAGICPOINT=pretrained starts from the shipped pretrained/magicpoint_synth.pth.
QUICKSTART_OUT ?= quickstart_output
QUICKSTART_MAGICPOINT ?= train
quickstart: venv
	$(PY) -m pipeline.quickstart --output $(QUICKSTART_OUT) --magicpoint $(QUICKSTART_MAGICPOINT)

bench: venv
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .pytest_cache
