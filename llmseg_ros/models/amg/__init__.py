"""Internals of the fast proposal path (``llmseg_ros.models.proposals``): two implementations of
SAM's mask decoder for many single-point prompts (``exact_decoder``, ``factored_decoder``;
their shared contract in ``decoding``), and the reference generator's filtering, NMS and
area ordering without its waste (``postprocess``)."""
