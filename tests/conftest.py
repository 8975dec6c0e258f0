"""Test configuration: scripts that tests run in subprocesses are not test modules."""

collect_ignore = ["ddp_script.py"]
