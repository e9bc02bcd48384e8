# Every target does its own set-up: a fresh clone needs nothing but python3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exactly as pinned: the CUDA build (runs on CPU) served from local disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/packer build samples/coco -o $(DEMO)/shards --format tfrecord --size 320 --overwrite
	$(BIN)/packer info $(DEMO)/shards
	$(BIN)/packer verify $(DEMO)/shards
	$(BIN)/python -m trainer.run $(DEMO)/shards --epochs 2 --imgsz 256 --batch 8 --out $(DEMO)/run --exist-ok

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf out .pytest_cache .ruff_cache
