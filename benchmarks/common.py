"""Shared helpers for benchmark scripts: environment description and result recording."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).with_name("results.jsonl")


def machine() -> dict:
    libs = {}
    for name in ("torch", "transformers", "tensorstore", "numpy", "zstandard"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    try:
        import torch

        threads = torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        threads, gpu = None, None
    return {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": threads, "gpu": gpu, "libraries": libs}


def record(benchmark: str, results: dict) -> None:
    """Append one JSON line with the command, the machine and the results."""
    line = {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **results}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    print(f"\nappended to {RESULTS}; command: {line['command']}")
