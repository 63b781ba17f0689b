"""Operator tools: inspect log blobs, and more to come (verify seed disks, key management)."""
