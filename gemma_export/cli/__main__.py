"""`python -m gemma_export.cli ...`: the same as `gemma-export ...`."""

import sys

from gemma_export.cli.main import main

sys.exit(main())
