"""fewsight.eval."""

__all__: list[str] = []
