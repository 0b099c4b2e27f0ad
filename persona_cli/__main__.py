"""``python -m persona_cli``: the same as the ``persona`` script."""

import sys

from persona_cli import main

sys.exit(main())
