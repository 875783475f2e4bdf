"""``python -m pipeopt.cli``: the ``pipeopt`` command."""

import sys

from pipeopt.cli import main

sys.exit(main())
