"""`python -m hemijax.data.phantom`: see hemijax.data.phantom.cli."""
import sys

from hemijax.data.phantom.cli import main

sys.exit(main())
