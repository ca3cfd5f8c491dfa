"""``python -m cleihc.cli``: the same as the ``cleihc`` command."""

import sys

from cleihc.cli import main

sys.exit(main())
