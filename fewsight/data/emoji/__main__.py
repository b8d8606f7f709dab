"""``python -m fewsight.data.emoji --install [DEST]``: fetch the emoji images (``make emoji-data``)."""

import logging

from fewsight.data.emoji.installer import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
