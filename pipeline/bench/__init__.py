"""Benchmarks (`make bench`): each reports ratios against a baseline measured in the same run
and rewrites its own section of BENCHMARKS.md, with the command that produced it."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}, {gpu}, torch {torch.__version__}"


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or add) the section `name` of BENCHMARKS.md."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nWritten by `make bench`.\n"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (f"<!-- {name} -->\n## {name}\n\n`{command}` ({stamp}; {machine()})\n\n{body.strip()}\n"
               f"<!-- /{name} -->\n")
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)
    print(section)


def make_command(target: str, argv: list[str]) -> str:
    """The make command line that reproduces a benchmark run with these arguments."""
    return f"make {target}" + (f" ARGS='{' '.join(argv)}'" if argv else "")
