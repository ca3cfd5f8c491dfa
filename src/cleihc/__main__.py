"""``python -m cleihc``: the same as the ``cleihc`` command."""

import sys

from cleihc.cli import main

sys.exit(main())
