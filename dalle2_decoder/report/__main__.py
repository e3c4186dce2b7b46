"""`python -m dalle2_decoder.report RUN_DIR`: see the package's docstring."""

import sys

from . import main

sys.exit(main())
