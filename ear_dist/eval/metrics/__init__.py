"""Eval metrics: concept accuracy and preservation, token-histogram shift, CLIP score, Frechet distance,
language-model perplexity."""


class MetricUnavailable(RuntimeError):
    """A metric that cannot run here (missing weights or package); says what to download and where.

    The evaluation reports it as not run and goes on with the metrics that can run.
    """
