"""moe-serve: train, evaluate and serve Mixture-of-Experts text classifiers."""

__version__ = "0.1.0"
