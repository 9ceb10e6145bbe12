"""The networks and their wrappers: SAM proposals, DINOv2 mask embeddings, the ``<SEG>`` VLM,
chat VLMs, the selector and heads, their losses, and the load-once model store."""
