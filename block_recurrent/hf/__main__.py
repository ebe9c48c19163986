"""``python -m block_recurrent.hf CHECKPOINT OUT_DIR``: a brt checkpoint as a transformers folder."""

import sys

from .convert import main

sys.exit(main())
