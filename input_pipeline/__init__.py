"""Data for jaxmedclip: TFDS builders, report parsing, tokenization, tf.data reading.

Importing this package is cheap and never imports TensorFlow: `findings`, `tokenizer`
and `synthetic_cxr` work without it. `synthetic_builder` and `pipeline` need
tensorflow and tensorflow-datasets.
"""
