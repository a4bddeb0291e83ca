"""Export: a trained checkpoint -> one self-describing file of packed integer weights.

``format`` (the file, its header, bit-plane packing), ``codes`` (what the packed integers
mean), ``exporter`` (checkpoint -> file), ``cli`` (the ``export``/``predict`` commands).
Nothing is imported here, so that building the CLI parser stays free of torch.
"""
