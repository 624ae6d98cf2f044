"""The worker scripts run in subprocesses of test_sharded.py; pytest must not import them."""

collect_ignore = ["_sharded_worker.py", "_multihost_worker.py", "fixtures/make_torch_reference.py"]
