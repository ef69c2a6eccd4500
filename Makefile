# memreg: `make demo` runs the main job on the embedded tiny default; `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memreg-installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) scripts/check_torch.py "$(TORCH_SPEC)"
	touch $(STAMP)

test: install
	$(PY) scripts/check_torch.py "$(TORCH_SPEC)"
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/demo.py --out demo_out

clean:
	rm -rf $(VENV) demo_out
