#!/usr/bin/env python
"""Train a DALL-E 2 decoder from one JSON config.

    accelerate launch train_decoder.py --config_file CFG.json      # one or many GPUs / nodes
    python train_decoder.py --config_file CFG.json                 # one process (GPU or CPU)
    python train_decoder.py --config_file CFG.json --check         # validate, print the resolved config

See README.md and docs/CONFIG.md.
"""

import sys

from dalle2_decoder.cli import main

if __name__ == "__main__":
    sys.exit(main())
