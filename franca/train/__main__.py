"""``python -m franca.train ...`` is ``python -m franca.train.train ...``."""

import sys

from franca.train.train import main

sys.exit(main())
