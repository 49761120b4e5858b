"""python -m fdino <command>"""

import sys

from .cli import main

sys.exit(main())
