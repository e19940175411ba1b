"""The demo model: a small OLMoE trained on the CPU with two planted, steerable behaviours.

`steermoe demo build DIR` trains it, `steermoe demo prepare DIR` also detects its profiles,
`steermoe demo serve DIR` serves it with the locked endpoint `demo-safe`.
"""
