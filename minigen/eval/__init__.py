"""Evaluations through the runtime, so every policy is scored on the same work:

    ppl.py      perplexity through prefill or the policy's decode path
    choice.py   multiple choice by log-likelihood (teacher-forced through the decode path)
    needle.py   passkey retrieval, greedy generation through the policy
    text.py     text inputs
    cli.py      `python -m minigen.eval ppl|choice|needle ... --json` (the last stdout line is JSON)
"""
