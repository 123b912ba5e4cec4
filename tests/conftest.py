"""Shared test setup: offline, no analytics, temp Prefect home; torch on one thread (2-core CI)."""
import os
import sys
from pathlib import Path

# tests/testlib.py (helpers shared by the test areas) is importable from every test module
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
