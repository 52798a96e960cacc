"""The transforms tests compare against transformers with ``tests/models/hf_reference.py``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
