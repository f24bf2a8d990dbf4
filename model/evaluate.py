"""The command ``python -m model.evaluate``: score a checkpoint on a dataset (VOC AP@0.5 and
COCO AP). The work, and the options, are in ``model.evaluation.evaluate``."""

from model.evaluation.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
