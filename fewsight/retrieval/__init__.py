"""fewsight.retrieval."""

__all__: list[str] = []
