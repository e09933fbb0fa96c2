"""`python -m common.export RUN --format torchscript|onnx`: a run's policy as one file (see common/export/policy.py)."""

import sys

from common.export.policy import main

sys.exit(main())
