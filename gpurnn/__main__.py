"""`python -m gpurnn`: the gpurnn command line."""
import sys

from .cli import main

sys.exit(main())
