"""Looking at what training did: the per-token reward inspector (token_rewards), several runs side by
side (compare), their curves (plot) and the terminal tables of reports (tables).

Reads what the core writes; the core never imports this package.
"""
