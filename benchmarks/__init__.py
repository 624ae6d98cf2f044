"""jxent benchmarks: `python -m benchmarks [losses|fused|sharded|all]`."""
