"""``python -m otree``: the same as the ``otree`` command."""

import sys

from ._cli import main

sys.exit(main())
