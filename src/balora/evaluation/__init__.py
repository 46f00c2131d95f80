"""Evaluation of fine-tuned language models, one module per concern.

``generate`` (the one generation loop), ``math`` / ``code`` / ``perplexity`` / ``mt_bench`` (one
module per benchmark), ``chat_backends`` (judges behind a chat interface), ``math_answers``
(answer extraction), ``classification`` (task metrics), ``sandbox`` (running generated code),
``runner`` and ``cli`` (``balora evaluate``).
"""
