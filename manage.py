#!/usr/bin/env python3
"""Export and inspect XLab models: ./manage.py export-checkpoint CHECKPOINT | inspect PATH (see --help)."""

import sys

from xlab.manage_cli import main

if __name__ == "__main__":
    sys.exit(main())
