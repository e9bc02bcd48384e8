"""packer: YOLO/COCO image folders -> pre-resized, indexed, checksummed shards."""

__version__ = "0.1.0"
