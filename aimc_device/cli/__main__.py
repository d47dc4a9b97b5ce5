"""``python -m aimc_device.cli``: the ``aimc-device`` command."""
import sys

from . import main

sys.exit(main())
