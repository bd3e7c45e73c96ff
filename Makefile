# The two entry points of the README. Each creates .venv if missing, installs the
# pinned stack and the package (editable), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

demo: $(STAMP)
	$(PY) tools/demo.py --pretrained none --diagnostics --json

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

venv: $(STAMP)

# Re-installs when a requirements file or setup.py changes.
$(STAMP): requirements/runtime.txt requirements/tests.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/tests.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) work_dirs outputs
