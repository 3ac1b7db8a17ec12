"""The stages of the tf.data input pipeline, in the order a batch goes through them.

  source.py     which records make up each batch (a function of (seed, step)), read by
                index from the ArrayRecord shards, and parsed
  decoupled.py  (training, `data.decoupled`) which rows read their labels as text or
                lose their image
  views.py      (training, `data.multiview`) the record each example takes its second
                view from
  text.py       each row's text (section, sentence sample, label prompt), normalised
                and tokenized
  pixels.py     PNG check, decoding, resizing and augmentation of each image
  batch.py      the batch `jaxmedclip/batch_schema.py` describes: masks, normalisation,
                text ids; the bad-example limit

`input_pipeline/pipeline.py` composes them (`make_dataset`).
"""
