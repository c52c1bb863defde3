"""``python -m resattn_diffusion.search``: the GLoRA structure search command line (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
