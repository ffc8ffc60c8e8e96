"""Models: the T5 v1.1 / Switch encoder-decoder."""
