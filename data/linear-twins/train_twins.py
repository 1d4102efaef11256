#!/usr/bin/env python
"""Train the twins in this folder: a softmax model and one model per linear kind, same data, same recipe.

    python data/linear-twins/train_twins.py                       # all twins not yet here (resumes)
    python data/linear-twins/train_twins.py --tasks recall --kinds gla --force

The same as `headlab train twins`; the recipe lives in headlab/models/linear/train.py (TwinParams).
"""

import sys

from headlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "twins", *sys.argv[1:]]))
