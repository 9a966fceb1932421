"""Other tools' formats: SimpleTuner's configs in (``python -m tuner.import simpletuner``), a single-file
checkpoint as the base (``base_file``) and out (``single_file``: ``python -m tuner.export single-file``)."""
