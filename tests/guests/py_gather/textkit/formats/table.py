from ..slug import slugify


def row(*cells: str) -> str:
    return "|".join(slugify(c) for c in cells)
