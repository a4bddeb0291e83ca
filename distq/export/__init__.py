"""Export: a trained checkpoint -> one self-describing file of packed integer weights.

``format`` (the file, its header, bit-plane packing), ``exporter`` (checkpoint -> file),
``cli`` (the ``export``/``predict`` commands). What the packed integers mean is each layer's
quantizer method's (``distq.quant.methods``: ``weight_codes``, ``integers``, ``act_record``).
Nothing is imported here, so that building the CLI parser stays free of torch.
"""
