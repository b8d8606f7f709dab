"""``python -m fewsight.cli``: the ``fewsight`` command."""

from fewsight.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
