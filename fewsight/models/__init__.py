"""fewsight.models."""

__all__: list[str] = []
