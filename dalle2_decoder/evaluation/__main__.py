"""`python -m dalle2_decoder.evaluation --config_file CFG.json --checkpoint PATH`: the command lives in
`dalle2_decoder/evaluate.py` (above training, whose checkpoints it reads); this entry shim keeps the
`-m` form working."""

import sys

from ..evaluate import main

if __name__ == "__main__":
    sys.exit(main())
