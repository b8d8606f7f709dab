"""fewsight.train."""

__all__: list[str] = []
