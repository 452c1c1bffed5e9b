"""The paper's post-hoc defense (§5): the server fine-tunes the aggregated global adapter on defense data
(aligned + normal), plus the behavioural aggregation rule ``safety_probe`` (beyond the paper)."""
