"""`python -m dalle2_decoder.evaluation --config_file CFG.json --checkpoint PATH`: see `cli.py`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
