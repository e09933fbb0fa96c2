"""`python -m common.build ...`: the local D4RL-recipe dataset builder (see common/build/recipe.py)."""

import sys

from common.build.recipe import main

sys.exit(main())
