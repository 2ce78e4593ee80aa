#!/usr/bin/env python3
"""Train and evaluate XLab models: ./xlab.py fit|validate|test|predict|prepare|stats -c conf/NAME.yaml"""

import sys

from xlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
