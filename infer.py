#!/usr/bin/env python3
"""Continue prompts with a trained XLab model: ./infer.py [OPTIONS] CHECKPOINT "PROMPT" (see --help)."""

import sys

from xlab.infer_cli import main

if __name__ == "__main__":
    sys.exit(main())
