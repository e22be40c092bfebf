"""The one training flow, driven by a job recipe: check -> load -> tokenize -> loaders -> train -> log -> publish."""
from __future__ import annotations


def run_job(cfg) -> dict:
    """Runs the training flow of `cfg`'s job and returns its result dict."""
    if cfg.job == "mlm":
        from flows.mlm import mlm_flow

        return mlm_flow(cfg)
    from flows.classify import classify_flow

    return classify_flow(cfg)
