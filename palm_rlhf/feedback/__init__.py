"""A Django + htmx web app that collects human feedback on a model's samples.

Responses (sampled from a checkpoint in the background, or imported from JSONL) become items;
logged-in raters score one response 1..K or pick the better of two; staff see agreement and
progress and export JSONL in the formats train_reward.py and DPO read. Start it with
`python -m palm_rlhf.feedback serve` (see __main__.py). Needs the extra: pip install palm-rlhf[feedback].

htmx is served from static/feedback/htmx-2.0.11.min.js: npm package htmx.org@2.0.11, dist/htmx.min.js,
0BSD licence, so raters' browsers never need a CDN.
"""
