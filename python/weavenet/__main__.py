"""`python -m weavenet` is the `weavenet` command."""

import sys

from weavenet.cli import main

sys.exit(main())
