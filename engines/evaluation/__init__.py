"""Evaluation as the paper does it. Each module exposes ``configure(parser)`` and
``main(args) -> int`` for ``hust19 evaluate WHAT``."""
