"""trainer: stream packed shards into YOLO training (DALI or PyTorch loaders)."""
