"""Evaluation of a pre-trained encoder, as the MAE paper measures it: linear probing (frozen
encoder, a linear head) and fine-tuning (every layer, with layer-wise lr decay). ``config`` loads
without torch; ``job`` runs one as a job of the shared loop."""
