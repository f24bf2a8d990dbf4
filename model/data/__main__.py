"""The command ``python -m model.data check SPEC``; the work is in ``model.data.check``."""

from model.data.check import main

if __name__ == "__main__":
    raise SystemExit(main())
