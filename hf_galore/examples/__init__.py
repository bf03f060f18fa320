"""Helpers of the repository's demo, recipes and benchmarks that users may import to run them offline.

Import-light: nothing here imports transformers or datasets at module import time.

* `offline_assets`: the offline MiniLM weights and the fixed movie-review and
  SMS-spam splits.
* `sentiment`: tokenization of `(text, label)` examples and the accuracy/F1 metrics
  of the sentiment demo.
"""
