"""`python -m mrtune` (and `accelerate launch -m mrtune train ...`)."""

import sys

from mrtune.cli import main

sys.exit(main())
