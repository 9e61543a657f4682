# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned set into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
BUILD ?= build
WORLD := $(BUILD)/world
SHARDS := $(BUILD)/world-shards

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# Order matters: deepspeed is a source package whose build imports torch,
# so torch goes in first and deepspeed is built without isolation.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) setuptools wheel ninja packaging psutil py-cpuinfo pydantic hjson msgpack einops numpy
	$(PIP) --no-build-isolation deepspeed
	$(PIP) --no-build-isolation -e '.[dev]'
	touch $@

demo: setup
	$(PY) tools/make_world.py $(WORLD)
	$(PY) tools/build_shards.py $(WORLD) $(SHARDS) --shard-size-mb 2 --cold-item-fraction 0.05
	$(PY) tools/inspect_shards.py $(SHARDS) --contact-sheet $(BUILD)/contact-sheet.png

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf $(BUILD)
