"""Model file of the analysis benchmark's target: 8 modalities, 24 residual blocks per tower
(about 6,000 fx nodes). ``blockfinder analyze benchmarks/deep8.py --no-render`` times the CLI."""

from bench_analyze import make  # the loader puts this file's directory on sys.path

REGULARIZERS = ["kl"]
_MODEL, _BATCH = make(8, 24)


def build_model():
    return _MODEL


def example_batch():
    return _BATCH
