"""The digits benchmark: a tiny text-conditioned Stable Diffusion trained offline on scikit-learn's digits.

* :mod:`benchmarks.digits.data` -- the 32x32 captioned digits, the train/test split, the unseen styles;
* :mod:`benchmarks.digits.classifier` -- the digit classifier (judge of content, Frechet-distance features);
* :mod:`benchmarks.digits.train_base` -- trains the shipped base pipeline (``assets/base_model``);
* :mod:`benchmarks.digits.evaluate_base` -- prompt following of a pipeline, judged by the classifier.
"""
