# Every target does its own set-up: a fresh clone needs nothing but python3.11.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := out/demo

.PHONY: demo test lint clean check-light gpu-check

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 2; }
	@# The venv takes 9.4 GB on disk (torch's CUDA build alone is 5.5 GB) plus pip's downloads: say so up front, not as pip's OSError halfway
	@test -d $(VENV) || $(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 1e9; \
	sys.exit(0 if free >= 10.5 else f'make: the venv needs about 10.5 GB free here; {free:.1f} GB is free')"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-cache-dir --upgrade pip
	# torch first, exactly as pinned: the CUDA build (runs on CPU) served from local disk
	$(BIN)/pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-cache-dir -e '.[train,s3,gcs,bench,dev]'
	# a benchmark peer that pins numpy<2.2; its imports are in [bench]
	$(BIN)/pip install -q --no-cache-dir --no-deps mosaicml-streaming==0.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/packer build samples/coco -o $(DEMO)/shards --format tfrecord --size 320 --overwrite
	$(BIN)/packer info $(DEMO)/shards
	$(BIN)/packer verify $(DEMO)/shards
	$(BIN)/python -m trainer.run $(DEMO)/shards --epochs 2 --imgsz 256 --batch 8 --out $(DEMO)/run --exist-ok
	$(BIN)/packer preview $(DEMO)/shards -n 16 -o $(DEMO)/preview.jpg
	@echo "look at: $(DEMO)/preview.jpg (packed samples) and $(DEMO)/run/train_batch0.jpg (what the model saw)"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The base install alone (no extras) in a fresh venv packs samples/ and reports its size.
LIGHT := out/light-venv
check-light:
	rm -rf $(LIGHT) out/light
	$(PYTHON) -m venv $(LIGHT)
	$(LIGHT)/bin/pip install -q --upgrade pip
	$(LIGHT)/bin/pip install -q .
	for f in tfrecord wds lmdb; do \
	  $(LIGHT)/bin/packer build samples/coco -o out/light/$$f --format $$f --size 128 --workers 1 && \
	  $(LIGHT)/bin/packer verify out/light/$$f --deep || exit 1; \
	done
	$(LIGHT)/bin/python -c "import importlib.util as u, sys; bad=[m for m in ('torch','tensorflow','ultralytics','nvidia.dali') if u.find_spec(m.split('.')[0])]; sys.exit(f'heavy packages installed: {bad}' if bad else 0)"
	rm -rf build
	@du -sh $(LIGHT) | awk '{print "base install (venv):", $$1}'

# On a GPU machine: the gpu-marked tests plus a loader->yolov8n throughput table (< 8 min).
# Uses the machine's own CUDA torch (--system-site-packages) and installs only the rest.
GPUVENV := .venv-gpu
gpu-check:
	@command -v nvidia-smi >/dev/null || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found)"; exit 2; }
	test -x $(GPUVENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPUVENV)
	$(GPUVENV)/bin/pip install -q -e . ultralytics==8.4.190 nvidia-dali-cuda120==2.4.0 webdataset==1.0.2 pytest==9.2.0
	$(GPUVENV)/bin/python benchmarks/gpu_check.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf out .pytest_cache .ruff_cache
