"""Making models, off the serving path: tiny random checkpoints for tests, training and distilling a
draft model (`tandem train`, `tandem distill`), the committed demo pair's recipe, and the measures of
a draft's acceptance and of quantization quality."""
