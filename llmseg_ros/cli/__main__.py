"""``python -m llmseg_ros.cli`` runs the ``llmseg`` command."""

import sys

from llmseg_ros.cli import main

sys.exit(main())
