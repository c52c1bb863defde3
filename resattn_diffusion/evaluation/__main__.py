"""``python -m resattn_diffusion.evaluation ...`` (same as ``resattn-eval``)."""

import sys

from .cli import main

sys.exit(main())
