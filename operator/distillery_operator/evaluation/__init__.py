"""The evaluation runner behind `distillery-eval` and the rollout's accuracy gate: a JSONL benchmark asked
of any OpenAI-compatible endpoint the way DeepSeek-R1 wants to be asked, scored, repeated, summarised.

Standard library + aiohttp only: it runs as a Job from the operator image, which has no torch.
"""
