"""Medical CLIP methods beyond the global contrastive loss.

- `local_alignment`: GLoRIA-style word-region alignment loss over the global batch, and
  SentencePiece sub-word pooling into word features.
- `multiview`: CXR-CLIP-style terms for two images and two texts per study.

The report labeler and `labels_to_prompt` (labels as text) live in
`input_pipeline.labeler`. docs/methods.md lists the proposed config keys.
"""
