#!/usr/bin/env python
"""LoRA ablation benchmark for VLMs: `python run_bench.py --suite docvqa` (see --help)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
