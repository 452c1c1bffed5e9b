"""The safety attack: automated generation of unaligned data, and malicious client behaviours.

Malicious clients in the engine train with exactly the benign clients' code path and hyper-parameters
(``fedsafe.fl.engine``); only their data differ (paper §4). Classical model-poisoning baselines
(sign flip, scaling, Gaussian noise) are ``attack.behaviour`` options, for comparison.
"""
