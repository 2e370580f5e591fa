"""``python -m qviz.bench quant --json``."""

import sys

from qviz.bench import main

sys.exit(main())
