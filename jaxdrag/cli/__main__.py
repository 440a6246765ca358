"""``python -m jaxdrag.cli …`` = ``jaxdrag …``."""

import sys

from . import main

sys.exit(main())
