"""gemnet: planned package of diffecon (see its issue); nothing public yet."""

__all__: list[str] = []
