"""Training of the HUST-19 models (needs the ``train`` extra: PyTorch on CPU). Each target
module exposes ``configure(parser)`` and ``main(args) -> int`` for ``hust19 train TARGET``."""
