"""Training half of the evolution cycle: base model, LoRA experts, router, evaluation and promotion.

Models never come from a hub here (bases are bootstrapped, uploaded to S3 or mounted), so the Hugging Face
libraries are put in offline mode before they are imported; a stray hub lookup fails fast instead."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
