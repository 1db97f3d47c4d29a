"""Where data and experiments live.

DATA_PATH: datasets (COCO/, HPatches/, KITTI/, synthetic_shapes_<suffix>/).
EXPER_PATH: experiments (logs/<exper_name>/).
Both default to folders relative to the working directory, as in the reference, and are overridden by
the environment variables of the same name, e.g. `DATA_PATH=../shared/data python export.py ...`.
"""
import os

DATA_PATH = os.environ.get("DATA_PATH", "datasets")
EXPER_PATH = os.environ.get("EXPER_PATH", "logs")
