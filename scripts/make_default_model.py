"""Replaced: the packaged default model is now trained by `scripts/train_default_model.py`.

This script used to write a random-weight tiny FLUX.1 checkpoint (`ditserve.testing.build_tiny_flux_pipeline`
still builds those for tests). It only points to the new script.
"""

import sys

if __name__ == "__main__":
    sys.exit("scripts/make_default_model.py is replaced by scripts/train_default_model.py: "
             "python scripts/train_default_model.py --help")
